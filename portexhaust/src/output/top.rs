//! `top`'s screen, as text. Pure (the terminal is `cmd::top`'s); `top --json` is the
//! schema's own [`TopView`] line.
use comfy_table::Cell;
use portexhaust_common::TcpState;

use super::text::{or_unknown, pct, right, table};
use crate::{engine::live::top_holders, schema::TopView};

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.1}{unit}"),
        _ => "-".into(),
    }
}

fn fmt_forecast(s: Option<f64>) -> String {
    match s {
        Some(x) if x <= 0.0 => "FULL".into(),
        Some(x) if x < 120.0 => format!("{x:.0}s"),
        Some(x) if x < 7200.0 => format!("{:.0}m", x / 60.0),
        Some(x) => format!("{:.0}h", x / 3600.0),
        None => "-".into(),
    }
}

/// The screen, as text. Pure, for tests. `rows` limits each panel.
pub fn render(v: &TopView, rows: usize) -> String {
    let mut out = format!(
        "portexhaust top  {}  backend {}  failures {}  tracked sockets {}  LRU evictions {}\n",
        v.ts.hms(),
        v.backend.name(),
        v.failures_total,
        v.tracked_sockets,
        v.lru_evictions
    );
    out.push_str("\nDESTINATIONS by pressure\n");
    if v.destinations.is_empty() {
        out.push_str("  no outgoing TCP connection uses an ephemeral port\n");
    } else {
        let header = [
            "NETNS",
            "SOURCE",
            "DESTINATION",
            "IN USE",
            "UTIL",
            "ESTAB",
            "TIME_WAIT",
            "NEW/S",
            "TW EXP/S",
            "FULL IN",
            "CONNECT p50/p99",
        ];
        let mut rows_out = Vec::new();
        for d in v.destinations.iter().take(rows) {
            let lat = d
                .latency_us
                .as_ref()
                .map(|l| format!("{:.0}us/{:.0}us", l.p50, l.p99))
                .unwrap_or_else(|| "-".into());
            rows_out.push(vec![
                Cell::new(or_unknown(d.netns)),
                Cell::new(d.src.map_or_else(|| "-".to_string(), |s| s.to_string())),
                Cell::new(d.dst.to_string()),
                right(format!("{}/{}", d.in_use, or_unknown(d.range_size))),
                right(pct(d.utilisation)),
                right(d.state(TcpState::Established)),
                right(d.time_wait()),
                right(fmt_opt(d.new_per_s, "")),
                right(fmt_opt(d.tw_expiring_per_s, "")),
                right(fmt_forecast(d.forecast_s)),
                right(lat),
            ]);
        }
        out.push_str(&table(&header, rows_out, ""));
        out.push('\n');
        if v.destinations.len() > rows {
            out.push_str(&format!("  (+{} more)\n", v.destinations.len() - rows));
        }
    }
    out.push_str(&super::nat::top_panel(&v.nat, rows));
    out.push_str("\nFAILING PROCESSES\n");
    if v.failing.is_empty() {
        out.push_str("  none since start\n");
    } else {
        let rows_out = v
            .failing
            .iter()
            .take(rows)
            .map(|f| {
                vec![
                    right(f.pid),
                    Cell::new(&f.comm),
                    right(f.failures),
                    right(format!("{:.1}", f.rate)),
                    Cell::new(f.top_dst.map(|d| d.to_string()).unwrap_or_default()),
                ]
            })
            .collect();
        out.push_str(&table(
            &["PID", "COMM", "FAILURES", "RATE/S", "TOP DESTINATION"],
            rows_out,
            "",
        ));
        out.push('\n');
    }
    out.push_str("\nHOLDERS (who created the sockets that use ports)\n");
    let holders = top_holders(&v.destinations);
    if holders.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&super::text::holders(
            holders.iter().take(rows),
            "COMM",
            "before tracing",
            "",
        ));
        out.push('\n');
    }
    if !v.call_sites.is_empty() {
        out.push_str("\nCALL SITES (the code that made the connects)\n");
        out.push_str(&super::text::call_sites(
            v.call_sites.iter().map(|c| (c.pid.to_string(), c)),
            rows,
            "",
        ));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use portexhaust_common::Backend;

    use super::*;
    use crate::schema::{
        Attribution, ByState, DestRow, FailingProcess, Holder, Latency, NatClient, NatEntry,
        NatRange, NatRow, Proto, Ts,
    };

    fn view() -> TopView {
        let mut by_state = ByState::new();
        by_state.insert(TcpState::TimeWait, 9);
        by_state.insert(TcpState::Established, 1);
        TopView {
            ts: Ts(1_764_069_600_000_000_000),
            backend: Backend::Tracepoint,
            failures_total: 4,
            dropped_events: 0,
            lru_evictions: 0,
            tracked_sockets: 10,
            destinations: vec![DestRow {
                new_per_s: Some(5.0),
                tw_expiring_per_s: Some(0.0),
                forecast_s: Some(0.0),
                latency_us: Some(Latency {
                    count: 10,
                    p50: 8.192,
                    p90: 16.384,
                    p99: 65.536,
                    buckets: vec![],
                }),
                holders: vec![Holder {
                    pid: Some(77),
                    comm: "churner".into(),
                    alive: false,
                    sockets: 9,
                    time_wait: 9,
                    share: 0.9,
                    attribution: Attribution::Traced,
                    container: None,
                    cgroup_id: 0,
                }],
                ..DestRow::new(
                    Some(4026532177),
                    Some("127.0.0.1".parse().expect("ip")),
                    "127.0.0.1:5000".parse().expect("addr"),
                    Some(10),
                    10,
                    by_state,
                )
            }],
            failing: vec![FailingProcess {
                pid: 88,
                comm: "failer".into(),
                failures: 4,
                rate: 2.0,
                top_dst: Some("127.0.0.1:5000".parse().expect("addr")),
            }],
            blame: vec![],
            call_sites: vec![],
            nat: vec![],
        }
    }

    fn nat_row() -> NatRow {
        let client = |pid: u32, comm: &str, count: u64| NatClient {
            pid: Some(pid),
            comm: comm.into(),
            netns: Some(4026532300),
            count,
            container: None,
        };
        NatRow {
            entry: NatEntry {
                router_netns: 4026532299,
                proto: Proto::Tcp,
                dst: "10.0.0.9:443".parse().expect("addr"),
                nat_addr: "192.0.2.1".parse().expect("ip"),
                drops: 3412,
                failers: vec![client(4242, "python3", 3100), client(4243, "curl", 312)],
                conntrack_entries: Some(10),
                in_use: Some(10),
                range: Some(NatRange {
                    lo: 40000,
                    hi: 40009,
                    source: "nft".into(),
                }),
                utilisation: Some(1.0),
                holders: vec![client(4242, "python3", 10)],
                insert_failed_delta: Some(3412),
            },
            drops_per_s: Some(56.9),
        }
    }

    #[test]
    fn nat_destinations_get_a_row_each() {
        let mut v = view();
        assert!(
            !render(&v, 10).contains("SOURCE NAT"),
            "no panel without drops"
        );
        v.nat = vec![nat_row()];
        let s = render(&v, 10);
        let line = s
            .lines()
            .find(|l| l.contains("10.0.0.9:443"))
            .expect("a NAT row");
        for want in [
            "4026532299",
            "192.0.2.1",
            "3412",
            "56.9",
            "10/10",
            "100%",
            "python3 (4242, netns 4026532300) x3100 (+1 more)",
            "python3 (4242, netns 4026532300) x10",
        ] {
            assert!(line.contains(want), "{want:?} in {line}");
        }
        let j: serde_json::Value = serde_json::from_str(&v.line()).expect("json");
        let n = &j["nat"][0];
        assert_eq!(n["drops"], 3412, "the summary's entry, flattened: {n}");
        assert_eq!(n["drops_per_s"], 56.9);
        assert_eq!(n["range"]["lo"], 40000);
        assert_eq!(n["failers"][0]["comm"], "python3");
    }

    #[test]
    fn screen_shows_the_three_panels() {
        let s = render(&view(), 10);
        assert!(s.contains("DESTINATIONS by pressure"));
        assert!(s.contains("127.0.0.1:5000"));
        assert!(s.contains("10/10"));
        assert!(s.contains("100%"));
        assert!(s.contains("FULL"));
        assert!(s.contains("8us/66us"));
        assert!(s.contains("failer"));
        assert!(s.contains("churner") && s.contains("exited"));
    }

    #[test]
    fn json_snapshot_is_one_object_with_destinations() {
        let v: serde_json::Value = serde_json::from_str(&view().line()).expect("json");
        assert_eq!(v["type"], "top");
        let d = &v["destinations"][0];
        for key in [
            "netns",
            "src",
            "dst",
            "proto",
            "range_size",
            "in_use",
            "by_state",
            "utilisation",
            "new_per_s",
            "tw_expiring_per_s",
            "forecast_s",
            "latency_us",
            "holders",
        ] {
            assert!(d.get(key).is_some(), "{key}");
        }
        assert_eq!(d["by_state"]["TIME_WAIT"], 9);
        assert_eq!(d["holders"][0]["pid"], 77);
        assert_eq!(v["failing"][0]["pid"], 88);
    }

    #[test]
    fn forecasts_read_well() {
        assert_eq!(fmt_forecast(Some(0.0)), "FULL");
        assert_eq!(fmt_forecast(Some(42.4)), "42s");
        assert_eq!(fmt_forecast(Some(600.0)), "10m");
        assert_eq!(fmt_forecast(Some(36000.0)), "10h");
        assert_eq!(fmt_forecast(None), "-");
    }
}
