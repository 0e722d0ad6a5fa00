//! The per-network-namespace settings that decide how soon ephemeral ports run out, and the
//! kernel counters that show how TIME_WAIT is handled.
//!
//! What they mean (the usable range, the reserved ports in it) is worked out here, purely; they
//! are read from `/proc` by `kernel::sysctl`, in the namespace concerned.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The settings recorded per network namespace (record header, `doctor`). Every field is
/// optional: a kernel may lack one (`tcp_tw_recycle` is gone since 4.12) and a record may have
/// been edited by hand.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSysctls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_local_port_range: Option<[u32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_local_reserved_ports: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_tw_reuse: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_fin_timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_max_tw_buckets: Option<i64>,
    /// TIME_WAIT reuse needs timestamps on both ends (`tcp_twsk_unique()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_timestamps: Option<i64>,
    /// Only present on kernels before 4.12, where it still existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_tw_recycle: Option<i64>,
}

/// `"32768\t60999"` -> `[32768, 60999]`.
pub fn parse_port_range(s: &str) -> Option<[u32; 2]> {
    let mut it = s.split_whitespace().map(str::parse::<u32>);
    let lo = it.next()?.ok()?;
    let hi = it.next()?.ok()?;
    if it.next().is_some() {
        return None;
    }
    Some([lo, hi])
}

impl NetSysctls {
    /// The ports `connect()` can pick from, or None when the range is unknown.
    pub fn range(&self) -> Option<PortRange> {
        let [lo, hi] = self.ip_local_port_range?;
        let reserved = self
            .ip_local_reserved_ports
            .as_deref()
            .map(parse_reserved)
            .unwrap_or_default();
        Some(PortRange::new(lo, hi, &reserved))
    }
}

/// The ephemeral range of a namespace and what is left of it after reserved ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub lo: u32,
    pub hi: u32,
    /// hi - lo + 1 (0 for an inverted range, which the kernel refuses to set).
    pub size: u64,
    /// Reserved ports that fall inside the range (`inet_is_local_reserved_port()` skips them).
    pub reserved_in_range: u64,
    /// Ports one destination can actually get: size - reserved_in_range.
    pub usable: u64,
}

impl PortRange {
    pub fn new(lo: u32, hi: u32, reserved: &[(u32, u32)]) -> Self {
        let size = if hi >= lo { u64::from(hi - lo) + 1 } else { 0 };
        let reserved_in_range = if size == 0 {
            0
        } else {
            reserved_overlap(reserved, lo, hi)
        };
        Self {
            lo,
            hi,
            size,
            reserved_in_range,
            usable: size.saturating_sub(reserved_in_range),
        }
    }
}

/// Parse `ip_local_reserved_ports` ("8080,9000-9100", or empty) into merged, sorted ranges.
/// Invalid pieces are skipped: the kernel never prints them, and a hand-edited record must not
/// stop a report.
pub fn parse_reserved(s: &str) -> Vec<(u32, u32)> {
    merge_ranges(
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .filter_map(|p| match p.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => p.parse().ok().map(|v| (v, v)),
            })
            .collect(),
    )
}

/// Inclusive port ranges, sorted, with overlapping and adjacent ones merged (so that each port
/// counts once) and inverted ones dropped.
pub fn merge_ranges(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.retain(|(a, b)| a <= b);
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// How many ports of `[lo, hi]` the (merged) reserved ranges cover.
pub fn reserved_overlap(reserved: &[(u32, u32)], lo: u32, hi: u32) -> u64 {
    reserved
        .iter()
        .filter_map(|&(a, b)| {
            let (s, e) = (a.max(lo), b.min(hi));
            (s <= e).then(|| u64::from(e - s) + 1)
        })
        .sum()
}

/// `TcpExt` counters of `/proc/net/netstat` that tell how TIME_WAIT was handled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpExtCounters {
    /// TIME_WAIT sockets reused for a new outgoing connection (`tcp_twsk_unique()`).
    #[serde(rename = "TWRecycled")]
    pub tw_recycled: Option<u64>,
    /// TIME_WAIT sockets not created because `tcp_max_tw_buckets` was reached
    /// ("TCP: time wait bucket table overflow").
    #[serde(rename = "TCPTimeWaitOverflow")]
    pub tw_overflow: Option<u64>,
}

/// Parse the `Prefix: names...` / `Prefix: values...` line pairs of /proc/net/netstat.
pub fn parse_netstat(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((p1, names)), Some((p2, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if p1 != p2 {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                out.insert(format!("{p1}.{n}"), v);
            }
        }
    }
    out
}

impl TcpExtCounters {
    pub fn from_netstat(text: &str) -> Self {
        let all = parse_netstat(text);
        Self {
            tw_recycled: all.get("TcpExt.TWRecycled").copied(),
            tw_overflow: all.get("TcpExt.TCPTimeWaitOverflow").copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_range_as_the_kernel_prints_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some([32768, 60999]));
        assert_eq!(parse_port_range("40000 40009"), Some([40000, 40009]));
        assert_eq!(parse_port_range("1"), None);
        assert_eq!(parse_port_range("a b"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }

    #[test]
    fn reserved_ports_are_merged_and_counted_inside_the_range() {
        let r = parse_reserved("9000-9100, 8080,9050-9200,x,5-3,,40005");
        assert_eq!(r, vec![(8080, 8080), (9000, 9200), (40005, 40005)]);
        assert_eq!(reserved_overlap(&r, 9100, 9300), 101);
        assert_eq!(reserved_overlap(&r, 40000, 40009), 1);
        let range = PortRange::new(40000, 40009, &r);
        assert_eq!(
            (range.size, range.reserved_in_range, range.usable),
            (10, 1, 9)
        );
        assert_eq!(PortRange::new(10, 5, &r).size, 0);
    }

    #[test]
    fn default_range_is_28232_ports() {
        let s = NetSysctls {
            ip_local_port_range: Some([32768, 60999]),
            ip_local_reserved_ports: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(s.range().map(|r| r.usable), Some(28232));
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent TWRecycled TCPTimeWaitOverflow\n\
                    TcpExt: 0 17 3\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 5\n";
        let c = TcpExtCounters::from_netstat(text);
        assert_eq!(c.tw_recycled, Some(17));
        assert_eq!(c.tw_overflow, Some(3));
        assert_eq!(parse_netstat(text).get("IpExt.InNoRoutes"), Some(&5));
        assert_eq!(
            TcpExtCounters::from_netstat("garbage"),
            TcpExtCounters::default()
        );
    }

    proptest! {
        #[test]
        fn reserved_parser_never_panics_and_stays_in_bounds(s in ".{0,80}", lo in 0u32..70000, len in 0u32..70000) {
            let r = parse_reserved(&s);
            let hi = lo.saturating_add(len);
            let range = PortRange::new(lo, hi, &r);
            prop_assert!(range.reserved_in_range <= range.size);
            for w in r.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }

        #[test]
        fn reserved_overlap_matches_brute_force(list in proptest::collection::vec((0u32..200, 0u32..20), 0..8), lo in 0u32..200, len in 0u32..100) {
            let s: Vec<String> = list.iter().map(|(a, l)| format!("{a}-{}", a + l)).collect();
            let r = parse_reserved(&s.join(","));
            let hi = lo + len;
            let brute = (lo..=hi).filter(|p| list.iter().any(|(a, l)| p >= a && *p <= a + l)).count() as u64;
            prop_assert_eq!(reserved_overlap(&r, lo, hi), brute);
        }
    }
}
