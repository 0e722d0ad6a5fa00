use portexhaust_common::{AF_INET6, Cause, IPPROTO_TCP};

use super::*;
use crate::{output::human::human_line, schema::Runtime, schema::event::validate};

fn event(family: u16, comm: &[u8]) -> FailureEvent {
    let mut c = [0u8; COMM_LEN];
    c[..comm.len()].copy_from_slice(comm);
    let (daddr, saddr) = if family == AF_INET {
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[10, 0, 0, 9]);
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&[192, 168, 1, 254]);
        (d, s)
    } else {
        (
            "fe80::1:2".parse::<Ipv6Addr>().expect("v6").octets(),
            "::1".parse::<Ipv6Addr>().expect("v6").octets(),
        )
    };
    FailureEvent {
        ts_ns: 0,
        cgroup_id: 4242,
        pid: 4_000_000,
        tid: 7,
        uid: 0,
        errno: 99,
        daddr,
        saddr,
        dport: 443,
        family,
        proto: IPPROTO_TCP,
        site: Site::InetHashConnect as u8,
        backend: Backend::TpBtf as u8,
        flags: EVENT_SADDR_KNOWN,
        comm: c,
        netns: 0,
        cause: Cause::Exhausted as u8,
        _pad: [0; 3],
    }
}

/// The fast writer and the reference renderers agree byte for byte, across second and
/// year boundaries, both families, odd command names, with and without a container.
#[test]
fn matches_the_reference_renderers() {
    let container = Arc::new(ContainerInfo {
        runtime: Runtime::Docker,
        id: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        pod: Some("checkout-7f9c".into()),
    });
    let mut w = EventWriter::new();
    for ts in [
        1_764_069_600_123_456_789i128,
        1_764_069_600_999_999_999,
        1_764_069_601_000_000_000,
        1_735_689_599_999_999_000,
        0,
    ] {
        for family in [AF_INET, AF_INET6] {
            for comm in [&b"python3"[..], b"a\"b\\c", b"\x01ctl", b"\xffbad", b""] {
                for (netns, c) in [(None, None), (Some(4026532177), Some(&container))] {
                    let mut ev = event(family, comm);
                    // Consecutive events that differ only in their cause must not share the
                    // rendered tail.
                    ev.cause = if comm.len() % 2 == 0 {
                        Cause::TupleCollision as u8
                    } else {
                        Cause::Exhausted as u8
                    };
                    ev.flags = if netns.is_some() {
                        EVENT_SADDR_KNOWN
                    } else {
                        0
                    };
                    let ts = Ts(ts);
                    let mut f = failure_from_event(&ev, |_| ts).expect("decodes");
                    f.netns = netns;
                    f.container = c.cloned();
                    w.clear();
                    w.json(&ev, ts, netns, c);
                    assert_eq!(
                        String::from_utf8_lossy(w.bytes()),
                        f.line() + "\n",
                        "{ts} {family} {comm:?}"
                    );
                    w.clear();
                    w.human(&ev, ts, netns, c);
                    assert_eq!(
                        String::from_utf8_lossy(w.bytes()),
                        human_line(&f) + "\n",
                        "{ts} {family} {comm:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn unknown_codes_are_refused() {
    let mut ev = event(AF_INET, b"x");
    assert!(validate(&ev).is_ok());
    ev.site = 99;
    assert_eq!(
        validate(&ev),
        Err(crate::schema::event::DecodeError::Site(99))
    );
    ev = event(7, b"x");
    assert_eq!(
        validate(&ev),
        Err(crate::schema::event::DecodeError::Family(7))
    );
}

mod speed {
    use portexhaust_common::IPPROTO_TCP;

    use super::*;

    #[test]
    #[ignore = "timing probe, run by hand"]
    fn format_a_million() {
        let mut ev = tests_event();
        let mut w = EventWriter::new();
        let t = std::time::Instant::now();
        let mut total = 0usize;
        for i in 0..1_000_000u64 {
            // A storm: one process, one destination; only the time moves.
            std::hint::black_box(&mut ev);
            w.json(
                &ev,
                Ts(1_764_069_600_123_456_789 + i as i128 * 5000),
                Some(4026532177),
                None,
            );
            if w.bytes().len() > 200_000 {
                total += w.bytes().len();
                w.clear();
            }
        }
        eprintln!("{:?} per event, {} bytes", t.elapsed() / 1_000_000, total);
    }

    fn tests_event() -> FailureEvent {
        let mut c = [0u8; COMM_LEN];
        c[..7].copy_from_slice(b"python3");
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[127, 0, 0, 1]);
        FailureEvent {
            ts_ns: 0,
            cgroup_id: 4242,
            pid: 40000,
            tid: 7,
            uid: 0,
            errno: 99,
            daddr: d,
            saddr: d,
            dport: 5000,
            family: AF_INET,
            proto: IPPROTO_TCP,
            site: 1,
            backend: 4,
            flags: EVENT_SADDR_KNOWN,
            comm: c,
            netns: 0,
            cause: 1,
            _pad: [0; 3],
        }
    }
}
