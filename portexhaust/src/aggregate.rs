//! Offenders: the exact in-kernel counts, grouped per process. Pure.
use std::{collections::BTreeMap, net::SocketAddr};

use portexhaust_common::{CountKey, CountValue};
use serde::Serialize;

use crate::model::{Family, comm_str, errno_name, ip_from_raw};

/// One destination of one offender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestCount {
    pub dst: String,
    pub errno: u32,
    pub failures: u64,
}

/// A process with failures, with everything the summary shows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offender {
    pub pid: u32,
    pub comm: String,
    pub failures: u64,
    pub first_unix_ns: i128,
    pub last_unix_ns: i128,
    /// Most failures first.
    pub destinations: Vec<DestCount>,
}

/// The end-of-run summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub backend: &'static str,
    pub duration_s: f64,
    /// Exact: counted in the kernel for every failure that passed the filters.
    pub failures_total: u64,
    /// Events the ring buffer could not take (counted in the kernel).
    pub dropped_events: u64,
    /// Failures whose per-destination key did not fit in the counts map.
    pub uncounted_keys: u64,
    pub offenders: Vec<Offender>,
    /// For each destination that saw failures: failers and port holders.
    pub blame: Vec<crate::blame::BlameEntry>,
    /// Sockets whose opener the kernel remembers now (ESTABLISHED through TIME_WAIT).
    pub tracked_sockets: u64,
    /// Owners the bounded LRU maps had to drop (attribution lost for those sockets).
    pub lru_evictions: u64,
    /// Failure kinds some hook watched (`connect`, `bind`, ...).
    pub watched: Vec<&'static str>,
    /// Failure kinds nothing watched, and why: their 0 is "not watched", not "none".
    pub not_watched: Vec<(&'static str, String)>,
}

pub fn dst_string(key: &CountKey) -> String {
    match Family::from_af(key.family) {
        Some(f) => SocketAddr::new(ip_from_raw(f, &key.daddr), key.dport).to_string(),
        None => format!("?af{}:{}", key.family, key.dport),
    }
}

/// Group the kernel's (pid, destination, errno) counts into offenders, most failures first.
pub fn offenders(
    counts: &[(CountKey, CountValue)],
    mono_to_unix: impl Fn(u64) -> i128,
) -> Vec<Offender> {
    let mut by_pid: BTreeMap<u32, Offender> = BTreeMap::new();
    for (k, v) in counts {
        let o = by_pid.entry(k.pid).or_insert_with(|| Offender {
            pid: k.pid,
            comm: comm_str(&v.comm),
            failures: 0,
            first_unix_ns: i128::MAX,
            last_unix_ns: i128::MIN,
            destinations: Vec::new(),
        });
        o.failures += v.count;
        o.first_unix_ns = o.first_unix_ns.min(mono_to_unix(v.first_ns));
        o.last_unix_ns = o.last_unix_ns.max(mono_to_unix(v.last_ns));
        o.destinations.push(DestCount {
            dst: dst_string(k),
            errno: u32::from(k.errno),
            failures: v.count,
        });
    }
    let mut out: Vec<Offender> = by_pid.into_values().collect();
    for o in &mut out {
        o.destinations.sort_by(|a, b| {
            b.failures
                .cmp(&a.failures)
                .then_with(|| a.dst.cmp(&b.dst))
                .then_with(|| a.errno.cmp(&b.errno))
        });
    }
    out.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
    out
}

/// "127.0.0.1:5000 EADDRNOTAVAIL x25, [::1]:5000 ... (+3 more)" for the human summary.
pub fn top_destinations(o: &Offender, n: usize) -> String {
    let mut parts: Vec<String> = o
        .destinations
        .iter()
        .take(n)
        .map(|d| format!("{} {} x{}", d.dst, errno_name(d.errno), d.failures))
        .collect();
    if o.destinations.len() > n {
        parts.push(format!("(+{} more)", o.destinations.len() - n));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::comm_bytes;
    use portexhaust_common::{AF_INET, AF_INET6, IPPROTO_TCP};

    fn key(pid: u32, last_octet: u8, port: u16, errno: u16) -> CountKey {
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, last_octet]);
        CountKey {
            pid,
            dport: port,
            family: AF_INET,
            errno,
            proto: IPPROTO_TCP,
            cause: 1,
            _pad: [0; 4],
            daddr,
        }
    }

    fn val(count: u64, first: u64, last: u64, comm: &str) -> CountValue {
        CountValue {
            count,
            first_ns: first,
            last_ns: last,
            comm: comm_bytes(comm),
            unstreamed: 0,
        }
    }

    #[test]
    fn groups_counts_per_process_and_orders_by_failures() {
        let counts = vec![
            (key(7, 1, 27017, 99), val(5, 100, 200, "python3")),
            (key(7, 2, 27017, 99), val(20, 50, 300, "python3")),
            (key(9, 1, 80, 98), val(3, 10, 20, "nginx")),
            (key(11, 1, 80, 99), val(40, 400, 500, "curl")),
        ];
        let off = offenders(&counts, |t| t as i128 * 10);
        assert_eq!(off.len(), 3);
        assert_eq!(off[0].pid, 11);
        assert_eq!(off[1].pid, 7);
        assert_eq!(off[1].failures, 25);
        assert_eq!(off[1].first_unix_ns, 500);
        assert_eq!(off[1].last_unix_ns, 3000);
        assert_eq!(off[1].destinations[0].dst, "10.0.0.2:27017");
        assert_eq!(off[1].destinations[0].failures, 20);
        assert_eq!(off[2].comm, "nginx");
        assert_eq!(off[2].destinations[0].errno, 98);
    }

    #[test]
    fn ipv6_destinations_are_bracketed() {
        let mut k = key(1, 1, 443, 99);
        k.family = AF_INET6;
        k.daddr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(dst_string(&k), "[::1]:443");
    }

    #[test]
    fn top_destinations_truncates() {
        let counts: Vec<_> = (1..=5)
            .map(|i| (key(1, i, 80, 99), val(u64::from(i), 0, 0, "x")))
            .collect();
        let off = offenders(&counts, |t| t as i128);
        let s = top_destinations(&off[0], 2);
        assert_eq!(
            s,
            "10.0.0.5:80 EADDRNOTAVAIL x5, 10.0.0.4:80 EADDRNOTAVAIL x4, (+3 more)"
        );
    }
}
