//! The wire format, pinned: the keys each line has, and that each line reads back as written.
use std::{borrow::Cow, sync::Arc};

use portexhaust_common::{Backend, Cause, Site, TcpState};
use serde_json::Value;

use super::*;

pub(crate) fn failure() -> Failure {
    Failure {
        ts: Ts(1_764_069_600_123_456_789),
        pid: 4242,
        tid: 4243,
        uid: 0,
        comm: "python3".into(),
        cgroup_id: 77,
        netns: Some(4026531840),
        family: Family::Ipv4,
        proto: Proto::Tcp,
        dst: "127.0.0.1:27017".parse().expect("addr"),
        src: Some("127.0.0.1".parse().expect("ip")),
        errno: Errno::EADDRNOTAVAIL,
        cause: portexhaust_common::Cause::Exhausted,
        site: Site::InetHashConnect,
        backend: Backend::Tracepoint,
        container: None,
        nat: None,
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

fn read_back(line: &str) -> Record<'static> {
    serde_json::from_str(line).expect("reads back")
}

#[test]
fn a_failure_line_has_exactly_the_documented_keys_and_reads_back() {
    let f = failure();
    let line = f.line();
    let v: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(
        keys(&v),
        [
            "backend",
            "cause",
            "cgroup_id",
            "comm",
            "container",
            "dst",
            "errname",
            "errno",
            "family",
            "netns",
            "pid",
            "proto",
            "site",
            "src",
            "tid",
            "ts",
            "type",
            "uid"
        ]
    );
    assert!(line.starts_with(r#"{"type":"failure","ts":"2025-11-25T11:20:00.123456Z","#));
    assert_eq!(v["errname"], "EADDRNOTAVAIL");
    assert_eq!(v["cause"], "exhausted");
    assert_eq!(v["site"], "__inet_hash_connect");
    assert_eq!(v["family"], "ipv4");
    let mut want = f.clone();
    want.ts = want.ts.micros();
    assert_eq!(read_back(&line), Record::Failure(Cow::Owned(want)));
}

#[test]
fn unknown_source_and_namespace_are_null_and_ipv6_is_bracketed() {
    let mut f = failure();
    f.src = None;
    f.netns = None;
    f.family = Family::Ipv6;
    f.dst = "[::1]:80".parse().expect("addr");
    f.container = Some(Arc::new(ContainerInfo {
        runtime: Runtime::Containerd,
        id: "0123456789abcdef".repeat(4),
        pod: None,
    }));
    let v: Value = serde_json::from_str(&f.line()).expect("json");
    assert!(v["src"].is_null() && v["netns"].is_null());
    assert_eq!(v["dst"], "[::1]:80");
    assert_eq!(v["container"]["runtime"], "containerd");
}

#[test]
fn a_tally_line_reads_back_and_a_version_1_entry_reads_as_a_tally() {
    let t = Tally {
        ts: Some(Ts(1_000_000_000)),
        pid: 7,
        comm: "app".into(),
        netns: Some(5),
        proto: Proto::Udp,
        dst: "10.0.0.1:53".parse().expect("addr"),
        errno: Errno::EAGAIN,
        cause: Cause::AutobindExhausted,
        count: 3,
        first_ts: None,
        last_ts: Ts(2_000_000_000),
        counted_by_snapshot: false,
    };
    let line = t.line();
    let v: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["type"], "tally");
    assert_eq!(v["errname"], "EAGAIN");
    assert_eq!(v["cause"], "autobind_exhausted");
    assert!(v.get("counted_by_snapshot").is_none());
    assert_eq!(read_back(&line), Record::Tally(Cow::Owned(t)));
    // What a version 1 `suppressed` line held per entry.
    let old: Tally = serde_json::from_str(
        r#"{"pid":1,"comm":"a","netns":2,"dst":"10.0.0.1:80","errno":99,"count":4,
            "first_ts":"2026-11-25T11:20:00.000000Z","last_ts":"2026-11-25T11:20:00.500000Z",
            "counted_by_snapshot":true}"#,
    )
    .expect("v1 entry");
    assert_eq!(
        (old.count, old.cause, old.proto),
        (4, Cause::Unknown, Proto::Tcp)
    );
    assert!(old.counted_by_snapshot);
}

fn totals() -> Totals {
    Totals {
        version: VERSION,
        ts: Some(Ts(1_764_069_601_000_000_000)),
        backend: Some(Backend::TpBtf),
        duration_s: Some(2.5),
        failures_total: 33,
        dropped_events: 2,
        uncounted_keys: 3,
        offenders: vec![Offender {
            pid: 4242,
            comm: "python3".into(),
            netns: Some(9),
            failures: 30,
            first_ts: Some(Ts(1_764_069_600_000_000_000)),
            last_ts: Some(Ts(1_764_069_601_000_000_000)),
            destinations: vec![DestCount {
                dst: "127.0.0.1:27017".parse().expect("addr"),
                errno: Errno::EADDRNOTAVAIL,
                cause: portexhaust_common::Cause::Exhausted,
                failures: 30,
            }],
        }],
        blame: vec![],
        destinations: vec![],
        call_sites: vec![crate::schema::CallSite {
            pid: 4242,
            comm: "python3".into(),
            netns: Some(9),
            dst: "127.0.0.1:27017".parse().expect("addr"),
            stack_id: Some(12),
            frames: vec![crate::schema::Frame {
                addr: 0x55_0000_1234,
                function: Some("fetch_orders".into()),
                file: Some("/srv/app/orders.c".into()),
                line: Some(42),
                module: Some("/srv/app/orders".into()),
                offset: Some(0x1234),
            }],
            symbols: None,
            connects: 900,
            bound_connects: 0,
            failures: 30,
            holds_established: 12,
            holds_time_wait: 800,
            holds_estimated: true,
        }],
        tracked_sockets: 10,
        lru_evictions: 4,
        watched: vec!["connect".into()],
        not_watched: [("bind".to_string(), "no fexit or kprobe".to_string())].into(),
        nat: Vec::new(),
        nat_unstreamed: 0,
    }
}

/// Drift bug: the summary once dropped `uncounted_keys`, and a report could not warn what the
/// tracer warned (tracked sockets, LRU evictions). Every field is written and read back.
#[test]
fn a_summary_keeps_every_count_the_tracer_knew() {
    let t = totals();
    let line = t.summary_line();
    let v: Value = serde_json::from_str(&line).expect("json");
    for (k, want) in [
        ("uncounted_keys", 3),
        ("tracked_sockets", 10),
        ("lru_evictions", 4),
        ("dropped_events", 2),
        ("failures_total", 33),
        ("version", VERSION),
    ] {
        assert_eq!(v[k], want, "{k}");
    }
    assert_eq!(
        v["offenders"][0]["destinations"][0]["errname"],
        "EADDRNOTAVAIL"
    );
    assert_eq!(v["not_watched"]["bind"], "no fexit or kprobe");
    assert_eq!(v["call_sites"][0]["frames"][0]["function"], "fetch_orders");
    assert_eq!(v["call_sites"][0]["holds_time_wait"], 800);
    let mut want = t.clone();
    want.ts = want.ts.map(Ts::micros);
    assert_eq!(read_back(&line), Record::Summary(Cow::Owned(want.clone())));
    assert_eq!(
        read_back(&t.snapshot_line()),
        Record::Snapshot(Cow::Owned(want))
    );
}

#[test]
fn version_1_lines_read_with_defaults() {
    let Record::Summary(s) = read_back(
        r#"{"type":"summary","backend":"tracepoint","duration_s":2.5,"failures_total":3,
            "dropped_events":0,"offenders":[],"blame":[{"dst":"127.0.0.1:5000","netns":1,
            "range_size":10,"in_use":10,"by_state":{"TIME_WAIT":10},"failers":[],
            "holders":[{"pid":null,"comm":"(before start)","alive":false,"sockets":10,
            "time_wait":10,"share":1.0,"attribution":"unknown","container":null}]}]}"#,
    ) else {
        panic!("not a summary")
    };
    assert_eq!(s.version, 1);
    assert_eq!(s.uncounted_keys, 0);
    assert_eq!(s.blame[0].by_state.get(&TcpState::TimeWait), Some(&10));
    assert_eq!(s.blame[0].holders[0].pid, None);
    let Record::Header(h) = read_back(
        r#"{"type":"header","version":1,"host":"web-7","start_ts":"2026-11-25T11:20:00Z",
            "backend":"tracepoint","sysctls":{"4026531840":{"ip_local_port_range":[32768,60999]}},
            "census":[]}"#,
    ) else {
        panic!("not a header")
    };
    assert_eq!(
        h.sysctls
            .get(&4026531840)
            .and_then(|s| s.range())
            .map(|r| r.usable),
        Some(28232)
    );
}
