//! The same engine gives the same answer: what the live path computed (the trace summary, a
//! record's snapshot) is what `report` says after replaying the lines the live path wrote.
use std::{
    collections::{BTreeMap, HashMap},
    io::Cursor,
};

use portexhaust_common::{AF_INET, Backend, OWNER_TIME_WAIT, Site, TcpState};

use super::{
    census::{NsCensus, OwnerView, PortSpace, SockRow, tuple_key},
    counts::{Counts, Key, KeyCount},
    live::{KernelTotals, Observed, Run, totals},
    report::{self, FileOut, Report},
    session::{Filter, Replay},
};
use crate::schema::{
    Errno, Failure, Family, Header, NetSysctls, Proto, Totals, Ts, VERSION, read::read_from,
};

const T0: i128 = 1_764_069_600_000_000_000;
const NS: u64 = 4026532177;

fn sock(sport: u16, state: TcpState, inode: u64) -> SockRow {
    SockRow {
        family: AF_INET,
        state,
        src: "10.0.0.2".parse().expect("ip"),
        sport,
        dst: "10.0.0.1".parse().expect("ip"),
        dport: 80,
        expires_ms: 30_000,
        uid: 0,
        inode,
    }
}

fn sysctls() -> NetSysctls {
    NetSysctls {
        ip_local_port_range: Some([40000, 40009]),
        tcp_tw_reuse: Some(0),
        ..Default::default()
    }
}

/// A moment of an incident: pid 7 failed 30 times towards 10.0.0.1:80 (twice towards :81),
/// and the port range towards it is held by pid 9, exited, with 8 TIME_WAIT sockets, and two
/// sockets opened before tracing.
fn observed() -> Observed {
    let sockets: Vec<SockRow> = (0..10)
        .map(|i| {
            let state = if i < 8 {
                TcpState::TimeWait
            } else {
                TcpState::Established
            };
            sock(40000 + i, state, 1000 + u64::from(i))
        })
        .collect();
    let owners = sockets[..8]
        .iter()
        .map(|s| {
            (
                tuple_key(NS, s),
                OwnerView {
                    pid: 9,
                    cgroup_id: 0,
                    comm: "leaky".into(),
                    alive: false,
                    flags: OWNER_TIME_WAIT,
                    closed_ns: 1,
                },
            )
        })
        .collect();
    let mut counts = Counts::new();
    let key = |port| Key {
        pid: 7,
        dst: format!("10.0.0.1:{port}").parse().expect("addr"),
        errno: Errno::EADDRNOTAVAIL,
        cause: portexhaust_common::Cause::Exhausted,
    };
    // Whole microseconds: the record writes times at that precision.
    let c = |n, first_ms: i128, last_ms: i128| KeyCount {
        count: n,
        first: Some(Ts(T0 + first_ms * 1_000_000)),
        last: Some(Ts(T0 + last_ms * 1_000_000)),
        comm: "app".into(),
        netns: None,
    };
    counts.insert(key(80), c(30, 100, 900));
    counts.insert(key(81), c(2, 200, 300));
    Observed {
        ts: Ts(T0 + 1_000_000_000),
        backend: Backend::TpBtf,
        kernel: KernelTotals {
            failures_total: 33,
            dropped_events: 1,
            uncounted_keys: 1,
            tracked_sockets: 8,
            lru_evictions: 4,
        },
        counts,
        census: vec![NsCensus {
            netns: NS,
            ports: PortSpace::from(&sysctls()),
            sockets,
        }],
        owners,
        fd_owners: HashMap::new(),
        dest_stats: Vec::new(),
        netns_of_pid: [(7, NS)].into(),
        sites: Vec::new(),
        stacks: HashMap::new(),
        sock_sites: HashMap::new(),
    }
}

fn run() -> Run {
    Run {
        duration_s: 1.0,
        blame: true,
        watched: vec!["connect".into()],
        not_watched: vec![("bind".into(), "no fexit".into())],
    }
}

fn header() -> Header {
    Header {
        version: VERSION,
        host: Some("h1".into()),
        kernel: Some("6.18".into()),
        start_ts: Some(Ts(T0)),
        backend: Some(Backend::TpBtf),
        pid: Some(1),
        netns: Some(NS),
        sysctls: BTreeMap::from([(NS, sysctls())]),
        census: Vec::new(),
        filters: None,
        tool: None,
        run_id: None,
        part: None,
    }
}

fn failure(ms: i128) -> Failure {
    Failure {
        ts: Ts(T0 + ms * 1_000_000),
        pid: 7,
        tid: 7,
        uid: 0,
        comm: "app".into(),
        cgroup_id: 0,
        netns: Some(NS),
        family: Family::Ipv4,
        proto: Proto::Tcp,
        dst: "10.0.0.1:80".parse().expect("addr"),
        src: None,
        errno: Errno::EADDRNOTAVAIL,
        cause: portexhaust_common::Cause::Exhausted,
        site: Site::InetHashConnect,
        backend: Backend::TpBtf,
        container: None,
        nat: None,
    }
}

fn replay(lines: &[String]) -> Report {
    let text = lines.join("\n") + "\n";
    let mut problems = Vec::new();
    let mut replay = Replay::new(Filter::default());
    let f = read_from("rec", Cursor::new(text), &mut replay, &mut problems);
    let sessions = replay.finish();
    let file = FileOut {
        path: f.path,
        usable: f.usable,
        lines: f.lines,
        sessions: sessions.len(),
    };
    report::build(vec![file], sessions, &Filter::default(), problems)
}

fn same_answer(live: &Totals, r: &Report) {
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.failures_total, live.failures_total);
    assert_eq!(r.dropped_events, live.dropped_events);
    assert_eq!(r.uncounted_keys, live.uncounted_keys, "drift bug 1");
    assert_eq!(r.lru_evictions, live.lru_evictions, "drift bug 2");
    let offenders: Vec<_> = r.offenders.iter().map(|o| o.item.clone()).collect();
    assert_eq!(offenders, live.offenders);
    let blame: Vec<_> = r.blame.iter().map(|b| b.item.clone()).collect();
    assert_eq!(blame, live.blame);
}

#[test]
fn a_clean_records_report_is_the_summary_trace_printed() {
    let live = totals(&observed(), &run());
    // The live answer itself, so that the comparison below is not between two empty lists.
    assert_eq!(live.offenders[0].failures, 32);
    assert_eq!(live.blame[0].holders[0].comm, "leaky");
    assert_eq!(live.blame[0].holders[0].time_wait, 8);
    assert_eq!(live.blame[0].range_size, Some(10));
    let lines = vec![
        header().line(),
        failure(100).line(),
        failure(150).line(),
        live.snapshot_line(),
        live.summary_line(),
    ];
    let r = replay(&lines);
    assert!(r.complete);
    same_answer(&live, &r);
    // What trace warns, report warns.
    let text = crate::output::report_text::render(&r);
    assert!(
        text.contains("1 failure is missing from the per-process table"),
        "{text}"
    );
    assert!(text.contains("4 socket owners were forgotten"), "{text}");
}

#[test]
fn a_killed_records_report_is_its_last_snapshot() {
    let live = totals(&observed(), &run());
    let lines = vec![header().line(), failure(100).line(), live.snapshot_line()];
    let r = replay(&lines);
    assert!(!r.complete);
    same_answer(&live, &r);
}

#[test]
fn trace_json_output_is_a_record() {
    // `trace --json` writes a header, failure lines and the summary (no snapshots).
    let live = totals(&observed(), &run());
    let lines = vec![header().line(), failure(100).line(), live.summary_line()];
    let r = replay(&lines);
    assert!(r.complete);
    same_answer(&live, &r);
    assert_eq!(r.sessions[0].host, "h1");
}

/// The metrics' destination rows are `top`'s: the same rows, forecast, connect counts and
/// latency histogram, without the holders and what-ifs the metrics do not serve.
#[test]
fn the_metrics_rows_are_tops_rows() {
    use super::live::{DestStat, Viewer};
    let mut obs = observed();
    let mut hist = [0u64; portexhaust_common::LATENCY_BUCKETS];
    hist[14] = 7;
    hist[20] = 1;
    obs.dest_stats = vec![DestStat {
        netns: NS,
        dst: "10.0.0.1:80".parse().expect("addr"),
        connects: 120,
        hist,
    }];
    let (mut top, mut metrics) = (Viewer::new(), Viewer::new());
    // Two refreshes with growth in between, so that there is a forecast.
    let mut later = obs.clone();
    later.census[0].sockets.truncate(6);
    let _ = top.view(1.0, &later);
    let _ = metrics.destinations(1.0, &later.census, &later.dest_stats);
    let view = top.view(6.0, &obs);
    let rows = metrics.destinations(6.0, &obs.census, &obs.dest_stats);
    assert_eq!(rows.len(), view.destinations.len());
    // Holders are named with the owners `top` reads and the metrics do not: compared apart.
    let bare = |r: &crate::schema::DestRow| crate::schema::DestRow {
        holders: Vec::new(),
        what_if: Vec::new(),
        load: None,
        ..r.clone()
    };
    for (m, t) in rows.iter().zip(&view.destinations) {
        assert_eq!(bare(m), bare(t));
    }
    let r = &rows[0];
    assert_eq!(r.connects, Some(120));
    let l = r.latency_us.as_ref().expect("latency");
    assert_eq!(l.count, 8);
    assert_eq!(l.buckets.len(), portexhaust_common::LATENCY_BUCKETS);
    assert_eq!((l.buckets[14], l.buckets[20]), (7, 1));
    // 6 -> 10 ports in use in 5 s of a 10-port range: full now.
    assert_eq!(r.forecast_s, Some(0.0));
}

/// `top`'s NAT rows: the summary's entries with drop rates, their drops in the total, and their
/// clients among the failing processes (added to a process that also failed connect()).
#[test]
fn top_takes_the_nat_entries_as_the_summary_has_them() {
    use crate::schema::{FailingProcess, NatClient, NatEntry, TopView};
    let entry = |drops: u64| NatEntry {
        router_netns: 1,
        proto: Proto::Tcp,
        dst: "10.0.0.9:443".parse().expect("addr"),
        nat_addr: "192.0.2.1".parse().expect("ip"),
        drops,
        failers: vec![
            NatClient {
                pid: Some(42),
                comm: "python3".into(),
                netns: Some(2),
                count: drops - 1,
                container: None,
            },
            NatClient {
                pid: None,
                comm: String::new(),
                netns: None,
                count: 1,
                container: None,
            },
        ],
        conntrack_entries: None,
        in_use: None,
        range: None,
        utilisation: None,
        holders: vec![],
        insert_failed_delta: None,
    };
    let view = |failing: Vec<FailingProcess>| TopView {
        ts: Ts(T0),
        backend: Backend::TpBtf,
        failures_total: 5,
        dropped_events: 0,
        lru_evictions: 0,
        tracked_sockets: 0,
        destinations: vec![],
        failing,
        blame: vec![],
        call_sites: vec![],
        nat: vec![],
    };
    let connect_failer = || FailingProcess {
        pid: 42,
        comm: "python3".into(),
        failures: 5,
        rate: 0.0,
        top_dst: None,
    };
    let mut viewer = super::live::Viewer::new();
    let mut v = view(vec![connect_failer()]);
    viewer.with_nat(1.0, &mut v, vec![entry(11)]);
    assert_eq!(v.failures_total, 16, "the NAT drops are in the total");
    assert_eq!(v.nat[0].drops_per_s, None, "no rate on the first sample");
    assert_eq!(
        v.failing[0].failures, 15,
        "connect failures and named NAT drops"
    );
    let mut v = view(vec![]);
    viewer.with_nat(3.0, &mut v, vec![entry(31)]);
    assert_eq!(v.nat[0].drops_per_s, Some(10.0));
    assert_eq!(v.nat[0].entry.drops, 31);
    let p = &v.failing[0];
    assert_eq!((p.pid, p.failures, p.rate), (42, 30, 10.0));
    assert_eq!(p.top_dst, Some("10.0.0.9:443".parse().expect("addr")));
}
