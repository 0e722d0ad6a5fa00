use portexhaust_common::AF_INET;

use super::*;

fn ports(lo: u16, hi: u16, reserved: Vec<(u16, u16)>) -> PortSpace {
    PortSpace {
        range: (lo, hi),
        reserved,
        ..PortSpace::default()
    }
}

#[test]
fn range_size_subtracts_reserved_ports_inside_it() {
    assert_eq!(ports(32768, 60999, vec![]).usable(), 28232);
    assert_eq!(ports(40000, 40009, vec![]).usable(), 10);
    assert_eq!(
        ports(40000, 40009, vec![(40002, 40003), (1, 2)]).usable(),
        8
    );
    // Overlapping and out-of-range reservations count once, clipped to the range.
    assert_eq!(
        ports(40000, 40009, vec![(39990, 40001), (40001, 40002)]).usable(),
        7
    );
    assert_eq!(ports(5, 4, vec![]).usable(), 0);
    // From the recorded form: the kernel's defaults where nothing was read.
    assert_eq!(PortSpace::from(&NetSysctls::default()).usable(), 28232);
}

fn row(state: TcpState, sport: u16, dport: u16, inode: u64, expires_ms: u32) -> SockRow {
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
        ports: ports(40000, 40009, vec![]),
        sockets: rows,
    }]
}

fn owner(pid: u32, comm: &str, alive: bool, flags: u32) -> OwnerView {
    OwnerView {
        pid,
        cgroup_id: 55,
        comm: comm.into(),
        alive,
        flags,
        closed_ns: 1,
    }
}

#[test]
fn usage_counts_states_and_attributes_holders() {
    use TcpState::*;
    let rows = vec![
        row(TimeWait, 40000, 5000, 0, 59_000),
        row(TimeWait, 40001, 5000, 0, 3_000),
        row(Established, 40002, 5000, 11, 0),
        row(Established, 40003, 5000, 12, 0),
        row(TimeWait, 40004, 5000, 0, 1_000),
        // the server side of a loopback connection: local port 5000, outside the range
        row(Established, 5000, 40002, 13, 0),
        row(Listen, 5000, 0, 14, 0),
    ];
    let c = census(rows.clone());
    let mut owners = HashMap::new();
    for r in &rows[..2] {
        owners.insert(
            tuple_key(7, r),
            owner(100, "churner", false, OWNER_TIME_WAIT),
        );
    }
    owners.insert(tuple_key(7, &rows[2]), owner(200, "app", true, 0));
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
    assert_eq!(d.by_state.get(&TimeWait), Some(&3));
    assert_eq!(d.by_state.get(&Established), Some(&2));
    assert_eq!(d.tw_expiring_10s, 2);
    let churner = &d.holders[0];
    assert_eq!(
        (churner.pid, churner.sockets, churner.time_wait),
        (Some(100), 2, 2)
    );
    assert!(!churner.alive);
    assert_eq!(churner.attribution, Attribution::Traced);
    // The traced closer's cgroup, to name its container after it exited.
    assert_eq!(churner.cgroup_id, 55);
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
    let r = d.row();
    assert_eq!(r.utilisation, Some(0.5));
    assert_eq!(r.time_wait(), 3);
}

#[test]
fn rows_group_client_sockets_per_source_and_destination() {
    use TcpState::*;
    let s = SockRow::fixture;
    let socks = vec![
        s("127.0.0.1:5000", "0.0.0.0:0", Listen),
        s("127.0.0.1:40000", "127.0.0.1:5000", TimeWait),
        s("127.0.0.1:40001", "127.0.0.1:5000", TimeWait),
        s("127.0.0.1:40002", "127.0.0.1:5000", Established),
        // the server side of the same connections: local port 5000 is not ephemeral
        s("127.0.0.1:5000", "127.0.0.1:40002", Established),
        s("127.0.0.2:40000", "127.0.0.1:5000", Established),
        s("[::1]:40003", "[::1]:443", FinWait2),
    ];
    let rows = destination_rows(&census(socks));
    assert_eq!(rows.len(), 3);
    let r = &rows[0];
    assert_eq!(
        (r.src.map(|s| s.to_string()), r.dst.to_string()),
        (Some("127.0.0.1".to_string()), "127.0.0.1:5000".to_string())
    );
    assert_eq!(r.in_use, 3);
    assert_eq!(r.time_wait(), 2);
    assert_eq!(r.state(Established), 1);
    assert!((r.utilisation.expect("known") - 0.3).abs() < 1e-9);
    assert_eq!(r.range_size, Some(10));
    assert_eq!(r.netns, Some(7));
    assert!(rows.iter().any(|r| r.dst.to_string() == "[::1]:443"));
    assert_eq!(busiest(rows, 5).len(), 1, "single sockets are no risk");
}

#[test]
fn expired_owners_are_only_finished_time_waits() {
    let mut o = Owner {
        pid: 1,
        flags: OWNER_TIME_WAIT,
        start_ns: 0,
        at_ns: 1_000_000_000,
    };
    let k = tuple_key(1, &row(TcpState::TimeWait, 40000, 80, 0, 0));
    assert_eq!(expired_owners(&[(k, o)], 70_000_000_000), vec![k]);
    assert!(expired_owners(&[(k, o)], 30_000_000_000).is_empty());
    // Still closing: kept for up to 15 minutes.
    o.flags = 0;
    assert!(expired_owners(&[(k, o)], 700_000_000_000).is_empty());
    assert_eq!(expired_owners(&[(k, o)], 1_000_000_000_000), vec![k]);
}
