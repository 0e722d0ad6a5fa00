//! Per-destination use of the ephemeral range, from `/proc/net/tcp{,6}` of one namespace.
//!
//! This is the stop-gap census for `doctor` and the record header: the sock_diag census
//! (in-kernel socket ownership, expiry times) replaces [`destination_usage`] when it lands, and
//! produces the same [`DestRow`] shape, so the callers do not change.
//!
//! A connect()ed socket occupies one local port *per 4-tuple*: exhaustion is per (source ip,
//! destination ip:port). So sockets are grouped by (local ip, remote ip:port), and only those
//! whose local port lies in the ephemeral range count (a server's accepted sockets have the
//! service port as local port and would otherwise show up as thousands of one-socket groups).
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use procfs::{
    FromReadSI, current_system_info,
    net::{TcpNetEntries, TcpNetEntry, TcpState},
};
use serde::{Deserialize, Serialize};

use crate::sysctl::PortRange;

/// connect() latency summary of a destination (filled by the in-kernel histograms).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub p50: Option<f64>,
    #[serde(default)]
    pub p90: Option<f64>,
    #[serde(default)]
    pub p99: Option<f64>,
}

/// One destination as seen from one source address in one namespace. The optional fields are
/// known only to the in-kernel census (rates, forecast, latency); readers must accept rows
/// without them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestRow {
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub src: Option<String>,
    #[serde(default)]
    pub dst: String,
    #[serde(default = "tcp")]
    pub proto: String,
    #[serde(default)]
    pub range_size: u64,
    #[serde(default)]
    pub in_use: u64,
    #[serde(default)]
    pub by_state: BTreeMap<String, u64>,
    #[serde(default)]
    pub utilisation: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tw_expiring_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Latency>,
}

fn tcp() -> String {
    "tcp".into()
}

impl DestRow {
    pub fn time_wait(&self) -> u64 {
        self.by_state.get("TIME_WAIT").copied().unwrap_or(0)
    }
}

/// Kernel names of TCP states, as `ss` and the census print them.
pub fn state_name(s: &TcpState) -> &'static str {
    match s {
        TcpState::Established => "ESTABLISHED",
        TcpState::SynSent => "SYN_SENT",
        TcpState::SynRecv => "SYN_RECV",
        TcpState::FinWait1 => "FIN_WAIT1",
        TcpState::FinWait2 => "FIN_WAIT2",
        TcpState::TimeWait => "TIME_WAIT",
        TcpState::Close => "CLOSE",
        TcpState::CloseWait => "CLOSE_WAIT",
        TcpState::LastAck => "LAST_ACK",
        TcpState::Listen => "LISTEN",
        TcpState::Closing => "CLOSING",
        TcpState::NewSynRecv => "NEW_SYN_RECV",
    }
}

/// One socket reduced to what grouping needs (so tests need no procfs types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockLine {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: &'static str,
}

impl From<&TcpNetEntry> for SockLine {
    fn from(e: &TcpNetEntry) -> Self {
        Self {
            local: e.local_address,
            remote: e.remote_address,
            state: state_name(&e.state),
        }
    }
}

/// Group sockets into destination rows, busiest first. Pure.
pub fn group(socks: &[SockLine], range: &PortRange, netns: Option<u64>) -> Vec<DestRow> {
    let mut by_dest: HashMap<(IpAddr, SocketAddr), BTreeMap<String, u64>> = HashMap::new();
    for s in socks {
        // LISTEN and NEW_SYN_RECV (request socks of a listener) hold no ephemeral port.
        if matches!(s.state, "LISTEN" | "NEW_SYN_RECV") {
            continue;
        }
        let port = u32::from(s.local.port());
        if port < range.lo || port > range.hi || s.remote.port() == 0 {
            continue;
        }
        *by_dest
            .entry((s.local.ip(), s.remote))
            .or_default()
            .entry(s.state.to_string())
            .or_default() += 1;
    }
    let mut rows: Vec<DestRow> = by_dest
        .into_iter()
        .map(|((src, dst), by_state)| {
            let in_use: u64 = by_state.values().sum();
            DestRow {
                netns,
                src: Some(src.to_string()),
                dst: dst.to_string(),
                proto: tcp(),
                range_size: range.usable,
                in_use,
                by_state,
                utilisation: if range.usable == 0 {
                    1.0
                } else {
                    (in_use as f64 / range.usable as f64).min(1.0)
                },
                ..Default::default()
            }
        })
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

/// TIME_WAIT and other states per destination in the calling thread's namespace (read through
/// `/proc/thread-self/net`, which follows a `setns()`ed thread). The swap point for the
/// sock_diag census.
pub fn destination_usage(range: &PortRange, netns: Option<u64>) -> std::io::Result<Vec<DestRow>> {
    let mut socks = Vec::new();
    for path in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        match TcpNetEntries::from_file(path, current_system_info()) {
            Ok(e) => socks.extend(e.0.iter().map(SockLine::from)),
            // No IPv6 in this kernel or namespace: nothing to count there.
            Err(_) if path.ends_with('6') => {}
            Err(e) => return Err(std::io::Error::other(format!("{path}: {e}"))),
        }
    }
    Ok(group(&socks, range, netns))
}

/// Sockets per TCP state in the calling thread's namespace, all addresses (for
/// `tcp_max_tw_buckets`, which counts every TIME_WAIT socket of the namespace).
pub fn state_totals() -> std::io::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for path in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        match TcpNetEntries::from_file(path, current_system_info()) {
            Ok(e) => {
                for s in &e.0 {
                    *out.entry(state_name(&s.state).to_string()).or_default() += 1;
                }
            }
            Err(_) if path.ends_with('6') => {}
            Err(e) => return Err(std::io::Error::other(format!("{path}: {e}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(local: &str, remote: &str, state: &'static str) -> SockLine {
        SockLine {
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            state,
        }
    }

    #[test]
    fn groups_client_sockets_per_source_and_destination() {
        let range = PortRange::new(40000, 40009, &[]);
        let socks = vec![
            s("127.0.0.1:5000", "0.0.0.0:0", "LISTEN"),
            s("127.0.0.1:40000", "127.0.0.1:5000", "TIME_WAIT"),
            s("127.0.0.1:40001", "127.0.0.1:5000", "TIME_WAIT"),
            s("127.0.0.1:40002", "127.0.0.1:5000", "ESTABLISHED"),
            // the server side of the same connections: local port 5000 is not ephemeral
            s("127.0.0.1:5000", "127.0.0.1:40002", "ESTABLISHED"),
            s("127.0.0.2:40000", "127.0.0.1:5000", "ESTABLISHED"),
            s("[::1]:40003", "[::1]:443", "FIN_WAIT2"),
        ];
        let rows = group(&socks, &range, Some(7));
        assert_eq!(rows.len(), 3);
        let r = &rows[0];
        assert_eq!(
            (r.src.as_deref(), r.dst.as_str()),
            (Some("127.0.0.1"), "127.0.0.1:5000")
        );
        assert_eq!(r.in_use, 3);
        assert_eq!(r.time_wait(), 2);
        assert_eq!(r.by_state.get("ESTABLISHED"), Some(&1));
        assert!((r.utilisation - 0.3).abs() < 1e-9);
        assert_eq!(r.range_size, 10);
        assert_eq!(r.netns, Some(7));
        assert!(rows.iter().any(|r| r.dst == "[::1]:443"));
    }

    #[test]
    fn rows_serialise_without_unknown_optional_fields() {
        let range = PortRange::new(40000, 40009, &[]);
        let rows = group(
            &[s("127.0.0.1:40000", "127.0.0.1:5000", "TIME_WAIT")],
            &range,
            None,
        );
        let v = serde_json::to_value(&rows[0]).expect("json");
        assert_eq!(v["by_state"]["TIME_WAIT"], 1);
        assert!(v.get("forecast_s").is_none());
        let back: DestRow = serde_json::from_value(v).expect("back");
        assert_eq!(back, rows[0]);
        // A census row from the in-kernel census parses too, with its extra fields.
        let full: DestRow = serde_json::from_str(
            r#"{"netns":1,"src":"10.0.0.1","dst":"10.0.0.2:80","proto":"tcp","range_size":28232,
            "in_use":20000,"by_state":{"TIME_WAIT":19000},"utilisation":0.7,"new_per_s":300.5,
            "tw_expiring_per_s":290.0,"forecast_s":null,"latency_us":{"count":5,"p50":10,"p90":20,"p99":900}}"#,
        )
        .expect("full row");
        assert_eq!(full.latency_us.map(|l| l.count), Some(5));
    }

    #[test]
    fn own_namespace_can_be_listed() {
        let range = PortRange::new(1, 65535, &[]);
        destination_usage(&range, None).expect("reading /proc/thread-self/net/tcp");
        state_totals().expect("totals");
    }
}
