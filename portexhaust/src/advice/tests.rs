use std::path::Path;

use super::*;
use crate::{
    engine::census::{NsCensus, PortSpace, SockRow, destination_rows},
    kernel::sysctl::read_from,
};

fn fixture(name: &str) -> NetSysctls {
    read_from(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sysctl")
            .join(name),
    )
}

/// The destination rows of these sockets in a namespace with settings `s`.
fn rows(s: &NetSysctls, sockets: Vec<SockRow>) -> Vec<DestRow> {
    destination_rows(&[NsCensus {
        netns: 1,
        ports: PortSpace::from(s),
        sockets,
    }])
}

fn ids(f: &[Finding], sev: Severity) -> Vec<&str> {
    f.iter()
        .filter(|x| x.severity == sev)
        .map(|x| x.id.as_str())
        .collect()
}

fn get<'a>(f: &'a [Finding], id: &str) -> &'a Finding {
    f.iter()
        .find(|x| x.id == id)
        .unwrap_or_else(|| panic!("no finding {id}: {f:#?}"))
}

fn no_recycle_advice(f: &[Finding]) {
    for x in f {
        for fix in &x.fixes {
            let cmd = fix.command.as_deref().unwrap_or("");
            assert!(
                !cmd.contains("tcp_tw_recycle=1"),
                "never recommend tcp_tw_recycle: {x:?}"
            );
        }
    }
}

fn fixes_are_ordered(f: &[Finding]) {
    for x in f {
        let kinds: Vec<FixKind> = x.fixes.iter().map(|f| f.kind).collect();
        let mut sorted = kinds.clone();
        sorted.sort();
        assert_eq!(kinds, sorted, "application fixes before sysctl ones: {x:?}");
    }
}

fn check(f: &[Finding]) {
    no_recycle_advice(f);
    fixes_are_ordered(f);
    for w in f.windows(2) {
        assert!(w[0].severity >= w[1].severity, "worst first");
    }
}

#[test]
fn debian_defaults_are_fine_apart_from_information() {
    let s = fixture("debian-default");
    let f = audit(&Inputs {
        sysctls: &s,
        counters: Some(&TcpExtCounters::default()),
        destinations: &[],
        time_wait_total: Some(10),
        bind_holders: Some(&[]),
        evidence: None,
        ..Default::default()
    });
    check(&f);
    assert!(ids(&f, Severity::Critical).is_empty(), "{f:#?}");
    assert!(ids(&f, Severity::Warning).is_empty(), "{f:#?}");
    let r = get(&f, "ip_local_port_range");
    assert!(r.title.contains("28232"), "{r:?}");
    assert!(r.detail.contains("470"), "28232 / 60 s: {r:?}");
    assert_eq!(get(&f, "tcp_tw_reuse").severity, Severity::Info);
    assert!(f.iter().all(|x| x.id != "tcp_tw_recycle"));
}

#[test]
fn a_tiny_range_and_no_reuse_are_both_flagged() {
    let s = fixture("tiny");
    let socks: Vec<SockRow> = (0..10)
        .map(|i| {
            SockRow::fixture(
                &format!("127.0.0.1:{}", 40000 + i),
                "127.0.0.1:5000",
                TcpState::TimeWait,
            )
        })
        .collect();
    let rows = rows(&s, socks);
    let f = audit(&Inputs {
        sysctls: &s,
        counters: None,
        destinations: &rows,
        time_wait_total: Some(10),
        bind_holders: None,
        evidence: None,
        ..Default::default()
    });
    check(&f);
    let crit = ids(&f, Severity::Critical);
    assert!(crit.contains(&"ip_local_port_range"), "{f:#?}");
    assert!(crit.contains(&"tcp_tw_reuse"), "{f:#?}");
    assert!(crit.contains(&"destination"), "{f:#?}");
    let d = get(&f, "destination");
    assert!(d.title.contains("10 of 10 ports (100%)"), "{d:?}");
    assert_eq!(d.fixes[0].kind, FixKind::Application);
    assert!(
        d.fixes[0].text.contains("closes these connections first"),
        "{d:?}"
    );
    assert!(
        d.fixes
            .iter()
            .any(|x| x.command.as_deref() == Some("sysctl -w net.ipv4.tcp_tw_reuse=1"))
    );
    assert_eq!(get(&f, "tcp_tw_reuse").fixes[0].kind, FixKind::Application);
}

#[test]
fn tuned_host_has_nothing_to_fix() {
    let s = fixture("tuned");
    let f = audit(&Inputs {
        sysctls: &s,
        counters: Some(&TcpExtCounters {
            tw_recycled: Some(12),
            tw_overflow: Some(0),
        }),
        destinations: &[],
        time_wait_total: Some(0),
        bind_holders: Some(&[]),
        evidence: None,
        ..Default::default()
    });
    check(&f);
    assert!(f.iter().all(|x| x.severity <= Severity::Info), "{f:#?}");
    assert_eq!(get(&f, "tcp_tw_reuse").severity, Severity::Ok);
    assert!(get(&f, "TWRecycled").title.contains("12"));
}

#[test]
fn legacy_tcp_tw_recycle_is_flagged_and_never_recommended() {
    let s = fixture("legacy-recycle");
    let f = audit(&Inputs {
        sysctls: &s,
        ..Default::default()
    });
    check(&f);
    let r = get(&f, "tcp_tw_recycle");
    assert_eq!(r.severity, Severity::Critical);
    assert!(
        r.detail.contains("4.12") && r.detail.contains("NAT"),
        "{r:?}"
    );
    assert!(
        r.fixes
            .iter()
            .any(|x| x.command.as_deref() == Some("sysctl -w net.ipv4.tcp_tw_recycle=0"))
    );
}

#[test]
fn reuse_without_timestamps_is_flagged() {
    let s = fixture("reuse-without-timestamps");
    let f = audit(&Inputs {
        sysctls: &s,
        ..Default::default()
    });
    check(&f);
    assert_eq!(get(&f, "tcp_timestamps").severity, Severity::Warning);
}

#[test]
fn reserved_ports_and_low_tw_buckets() {
    let s = fixture("reserved-heavy");
    let f = audit(&Inputs {
        sysctls: &s,
        counters: Some(&TcpExtCounters {
            tw_recycled: None,
            tw_overflow: Some(42),
        }),
        destinations: &[],
        time_wait_total: Some(4000),
        bind_holders: Some(&[]),
        evidence: None,
        ..Default::default()
    });
    check(&f);
    let r = get(&f, "ip_local_reserved_ports");
    assert_eq!(r.severity, Severity::Warning);
    assert!(r.title.starts_with("17233 ports"), "{r:?}");
    assert_eq!(get(&f, "tcp_max_tw_buckets").severity, Severity::Warning);
    assert!(get(&f, "TCPTimeWaitOverflow").title.contains("42"));
    // 28232 - 17233 = 10999 usable: fine for the range rule itself.
    assert!(get(&f, "ip_local_port_range").title.contains("10999"));
    // tcp_fin_timeout=120 is mentioned, and never as a TIME_WAIT fix.
    let fin = get(&f, "tcp_fin_timeout");
    assert_eq!(fin.severity, Severity::Info);
    assert!(fin.detail.contains("does not shorten TIME_WAIT"));
}

#[test]
fn bind_holders_and_record_evidence() {
    let s = fixture("debian-default");
    let holders = [BindHolder {
        pid: 7,
        comm: "legacy-client".into(),
        sockets: 300,
        example: "10.0.0.1:40000".into(),
    }];
    let ev = Evidence {
        connect_failures: 5,
        bind_failures: 3,
        udp_failures: 2,
        collisions: 4,
        snat_drops: 0,
        bound_connects: vec![BoundConnects {
            pid: 7,
            comm: "envoy".into(),
            dst: "10.0.0.9:443".into(),
            connects: 900,
            of: 1000,
            site: Some("upstream_connect (conn.cc:12)".into()),
        }],
    };
    let f = audit(&Inputs {
        sysctls: &s,
        bind_holders: Some(&holders),
        evidence: Some(&ev),
        ..Default::default()
    });
    check(&f);
    let b = get(&f, "bind_before_connect");
    assert_eq!(b.severity, Severity::Warning);
    assert!(b.detail.contains("legacy-client (pid 7): 300"));
    assert!(b.fixes[0].text.contains("IP_BIND_ADDRESS_NO_PORT"));
    assert_eq!(
        get(&f, "connect_eaddrnotavail").severity,
        Severity::Critical
    );
    let c = get(&f, "connect_tuple_collision");
    assert!(c.title.contains("4 times"), "{c:?}");
    assert!(c.fixes[0].text.contains("IP_BIND_ADDRESS_NO_PORT"), "{c:?}");
    assert!(
        get(&f, "bind_eaddrinuse").fixes[0]
            .text
            .contains("IP_BIND_ADDRESS_NO_PORT")
    );
    assert!(get(&f, "udp_autobind_eagain").title.contains("EAGAIN"));
    let bc = get(&f, "connects_on_bound_sockets");
    assert_eq!(bc.severity, Severity::Warning);
    assert!(bc.title.starts_with("900 connects"), "{bc:?}");
    assert!(
        bc.detail
            .contains("envoy (pid 7) to 10.0.0.9:443: 900 of 1000 connects from upstream_connect"),
        "{bc:?}"
    );
    assert!(bc.fixes[0].text.contains("IP_BIND_ADDRESS_NO_PORT"));
}

#[test]
fn established_and_close_wait_destinations_get_their_own_advice() {
    let s = fixture("tiny");
    let mk = |state: TcpState, dport: u16| -> Vec<SockRow> {
        (0..9)
            .map(|i| {
                SockRow::fixture(
                    &format!("127.0.0.1:{}", 40000 + i),
                    &format!("127.0.0.1:{dport}"),
                    state,
                )
            })
            .collect()
    };
    let mut socks = mk(TcpState::Established, 80);
    socks.extend(mk(TcpState::CloseWait, 81));
    let rows = rows(&s, socks);
    let f = audit(&Inputs {
        sysctls: &s,
        destinations: &rows,
        ..Default::default()
    });
    check(&f);
    let dests: Vec<&Finding> = f.iter().filter(|x| x.id == "destination").collect();
    assert_eq!(dests.len(), 2);
    assert!(dests.iter().any(|d| d.fixes[0].text.contains("pool size")));
    assert!(dests.iter().any(|d| d.fixes[0].text.contains("leak")));
}

#[test]
fn empty_or_unknown_settings_do_not_panic() {
    let s = NetSysctls::default();
    let f = audit(&Inputs {
        sysctls: &s,
        ..Default::default()
    });
    assert_eq!(get(&f, "ip_local_port_range").severity, Severity::Info);
    let s = NetSysctls {
        ip_local_port_range: Some([5, 1]),
        tcp_tw_reuse: Some(7),
        ..Default::default()
    };
    let f = audit(&Inputs {
        sysctls: &s,
        ..Default::default()
    });
    assert_eq!(get(&f, "ip_local_port_range").severity, Severity::Critical);
    assert!(get(&f, "tcp_tw_reuse").title.contains("not a documented"));
}
