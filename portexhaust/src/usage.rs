//! Per-destination use of the ephemeral range as `doctor` and the record list it: rows of the
//! sock_diag census ([`crate::nsinfo::census_of`]) grouped by [`crate::blame::usage`], the
//! same path `trace` and `top` take.
//!
//! A connect()ed socket occupies one local port *per 4-tuple*: exhaustion is per (source ip,
//! destination ip:port). So sockets are grouped by (local ip, remote ip:port), and only those
//! whose local port lies in the ephemeral range count (a server's accepted sockets have the
//! service port as local port and would otherwise show up as thousands of one-socket groups).
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{
    blame::{self, DestUsage},
    nsinfo::NsCensus,
};

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

impl From<&DestUsage> for DestRow {
    fn from(u: &DestUsage) -> Self {
        Self {
            netns: Some(u.netns),
            src: Some(u.src.to_string()),
            dst: u.dst.to_string(),
            proto: tcp(),
            range_size: u64::from(u.range_size),
            in_use: u.in_use,
            by_state: u
                .by_state
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            utilisation: u.utilisation().min(1.0),
            ..Default::default()
        }
    }
}

/// Destination rows of censused namespaces, busiest first. Pure.
pub fn destination_rows(census: &[NsCensus]) -> Vec<DestRow> {
    let mut rows: Vec<DestRow> = blame::usage(census, &HashMap::new(), &HashMap::new())
        .iter()
        .map(DestRow::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nsinfo::NsSysctls, sockdiag::SockRow};

    fn s(local: &str, remote: &str, state: &str) -> SockRow {
        SockRow::fixture(local, remote, state)
    }

    fn census(lo: u16, hi: u16, sockets: Vec<SockRow>, netns: u64) -> Vec<NsCensus> {
        vec![NsCensus {
            netns,
            sysctls: NsSysctls {
                ip_local_port_range: (lo, hi),
                reserved: Vec::new(),
            },
            sockets,
        }]
    }

    #[test]
    fn groups_client_sockets_per_source_and_destination() {
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
        let rows = destination_rows(&census(40000, 40009, socks, 7));
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
        let rows = destination_rows(&census(
            40000,
            40009,
            vec![s("127.0.0.1:40000", "127.0.0.1:5000", "TIME_WAIT")],
            1,
        ));
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
        let netns = crate::procinfo::netns_of(std::process::id()).expect("netns");
        let sockets = crate::sockdiag::dump_tcp().expect("listing through sock_diag");
        destination_rows(&census(1, 65535, sockets, netns));
        crate::sockdiag::dump_tcp_listeners().expect("listeners");
    }
}
