//! What each fix would buy: the steady state of one destination's ports from its measured
//! load, now and under each fix. Pure.
//!
//! Little's law: a port is held for the connection's lifetime plus the TIME_WAIT that follows
//! an active close (`TCP_TIMEWAIT_LEN`, 60 s, fixed in the kernel; about 1 s where
//! `tcp_tw_reuse` lets a new connection take a port in TIME_WAIT: `tcp_twsk_unique()` needs
//! timestamps and a second since the last segment). With `rate` new connections a second, the
//! ports in use settle at `rate x (lifetime + hold)`. The lifetime is not measured per
//! connection: Little's law again, on the sockets that are not in TIME_WAIT.
//!
//! Application fixes come first (they remove the cause), then capacity, then sysctls.
//! `tcp_tw_recycle` is never offered: it broke clients behind NAT and is gone since 4.12.
use super::census::PortSpace;
use crate::schema::{DestRow, Load, WhatIf};

/// `TCP_TIMEWAIT_LEN`.
pub const TIME_WAIT_S: f64 = 60.0;
/// How long a port in TIME_WAIT blocks a new connection where `tcp_tw_reuse` applies.
pub const REUSE_HOLD_S: f64 = 1.0;
/// The range `doctor` and the fixes suggest widening to
/// (`sysctl -w net.ipv4.ip_local_port_range="10240 65535"`).
pub const WIDE_RANGE: (u16, u16) = (10240, 65535);
/// How much a pool or keep-alive cuts new connections by, in the projection.
pub const POOL_FACTOR: f64 = 10.0;

/// Whether `tcp_tw_reuse` lets new connections to `row.dst` take ports in TIME_WAIT: 1 for
/// every destination, 2 (the default since Linux 5.5) for loopback only; never without
/// timestamps.
pub fn reuse_applies(tw_reuse: Option<i64>, timestamps: Option<i64>, row: &DestRow) -> bool {
    let loopback = match row.dst.ip() {
        std::net::IpAddr::V4(v) => v.is_loopback(),
        std::net::IpAddr::V6(v) => {
            v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback())
        }
    };
    timestamps != Some(0)
        && match tw_reuse {
            Some(1) => true,
            Some(2) => loopback,
            _ => false,
        }
}

/// The load on a row: its connect rate (measured, or from its TIME_WAIT sockets), its
/// connections' mean lifetime and how long TIME_WAIT holds a port. None without a rate.
pub fn load(row: &DestRow, ports: &PortSpace) -> Option<Load> {
    let tw = row.time_wait() as f64;
    let open = row.in_use.saturating_sub(row.time_wait()) as f64;
    let (rate, from) = match row.new_per_s {
        Some(r) if r > 0.0 && r.is_finite() => (r, "connects"),
        _ if tw > 0.0 => (tw / TIME_WAIT_S, "time_wait"),
        _ => return None,
    };
    let hold = if reuse_applies(ports.tw_reuse, ports.timestamps, row) {
        REUSE_HOLD_S
    } else {
        TIME_WAIT_S
    };
    Some(Load {
        rate_per_s: rate,
        rate_from: from.into(),
        lifetime_s: open / rate,
        tw_hold_s: hold,
    })
}

/// The steady state of `rate` connections a second held `lifetime + hold` on `capacity` ports,
/// starting from `in_use`.
fn project(fix: &str, kind: &str, text: String, p: Projection, now: u64) -> WhatIf {
    let held = p.lifetime + p.hold;
    let in_use = p.rate * held;
    let cap = p.capacity as f64;
    let full_in_s = if in_use < cap {
        None
    } else if now as f64 >= cap {
        Some(0.0)
    } else {
        // Filling: new ports arrive at `rate`, old ones leave at `occupied / held`.
        let growth = p.rate - now as f64 / held.max(1e-9);
        (growth > 1e-9).then(|| (cap - now as f64) / growth)
    };
    WhatIf {
        fix: fix.into(),
        kind: kind.into(),
        text,
        in_use: (in_use * 10.0).round() / 10.0,
        capacity: p.capacity,
        headroom: ((cap - in_use) * 10.0).round() / 10.0,
        full_in_s: full_in_s.map(|s| s.round()),
    }
}

#[derive(Clone, Copy)]
struct Projection {
    rate: f64,
    lifetime: f64,
    hold: f64,
    capacity: u64,
}

/// The what-if table of one row: now, then each fix that changes something, application
/// fixes first.
pub fn what_if(row: &DestRow, ports: &PortSpace) -> Vec<WhatIf> {
    let Some(l) = load(row, ports) else {
        return Vec::new();
    };
    let capacity = row.range_size.unwrap_or_else(|| ports.usable());
    let base = Projection {
        rate: l.rate_per_s,
        lifetime: l.lifetime_s,
        hold: l.tw_hold_s,
        capacity,
    };
    let now = row.in_use;
    let mut out = vec![project("now", "now", "as it is".into(), base, now)];
    let k = l.rate_per_s / POOL_FACTOR;
    out.push(project(
        "pooling",
        "application",
        format!(
            "reuse connections (a pool or keep-alive): {k:.1} new connections/s instead of {:.1}",
            l.rate_per_s
        ),
        Projection { rate: k, ..base },
        now,
    ));
    if l.tw_hold_s > 0.0 {
        out.push(project(
            "server_closes_first",
            "application",
            "let the server close first: TIME_WAIT stays on the server".into(),
            Projection { hold: 0.0, ..base },
            now,
        ));
    }
    // IP_LOCAL_PORT_RANGE (Linux 6.3+) gives a socket its own range, but the kernel intersects
    // it with the namespace's (inet_sk_get_local_port_range): it confines this client to a
    // slice, so that it cannot starve the others, and buys it no port. Shown so that nobody
    // expects otherwise.
    out.push(project(
        "ip_local_port_range_per_socket",
        "application",
        "IP_LOCAL_PORT_RANGE on this client's sockets (Linux 6.3+): keeps it to a slice of the \
         range so the others keep theirs; no more ports for it"
            .into(),
        base,
        now,
    ));
    out.push(project(
        "more_sources",
        "capacity",
        "one more source address (each has its own range towards the destination)".into(),
        Projection {
            capacity: capacity * 2,
            ..base
        },
        now,
    ));
    let wide = PortSpace {
        range: WIDE_RANGE,
        ..ports.clone()
    }
    .usable();
    if wide > capacity {
        out.push(project(
            "wider_range",
            "sysctl",
            format!(
                "ip_local_port_range {} {} ({wide} usable ports)",
                WIDE_RANGE.0, WIDE_RANGE.1
            ),
            Projection {
                capacity: wide,
                ..base
            },
            now,
        ));
    }
    let could_reuse = reuse_applies(Some(1), ports.timestamps, row);
    if l.tw_hold_s > REUSE_HOLD_S && could_reuse {
        out.push(project(
            "tcp_tw_reuse",
            "sysctl",
            "tcp_tw_reuse=1: new connections take ports after 1 s of TIME_WAIT".into(),
            Projection {
                hold: REUSE_HOLD_S,
                ..base
            },
            now,
        ));
    }
    out
}

/// The row with its load and what-if table filled in.
pub fn with_what_if(mut row: DestRow, ports: &PortSpace) -> DestRow {
    row.load = load(&row, ports);
    row.what_if = what_if(&row, ports);
    row
}

#[cfg(test)]
mod tests {
    use portexhaust_common::TcpState;

    use super::*;
    use crate::schema::ByState;

    fn row(dst: &str, estab: u64, tw: u64, range: u64, rate: Option<f64>) -> DestRow {
        let by_state: ByState = [(TcpState::Established, estab), (TcpState::TimeWait, tw)].into();
        DestRow {
            new_per_s: rate,
            ..DestRow::new(
                Some(1),
                None,
                dst.parse().expect("addr"),
                Some(range),
                estab + tw,
                by_state,
            )
        }
    }

    fn no_reuse() -> PortSpace {
        PortSpace {
            tw_reuse: Some(0),
            ..PortSpace::default()
        }
    }

    fn get<'a>(w: &'a [WhatIf], fix: &str) -> &'a WhatIf {
        w.iter()
            .find(|x| x.fix == fix)
            .unwrap_or_else(|| panic!("{fix}: {w:?}"))
    }

    #[test]
    fn little_s_law_from_the_measured_rate() {
        // 40 connections/s, 20 s into the run: 800 in TIME_WAIT, 40 open (1 s each).
        let r = row("10.0.0.1:80", 40, 800, 3000, Some(40.0));
        let w = what_if(&r, &no_reuse());
        let now = get(&w, "now");
        assert_eq!(now.in_use, 40.0 * (1.0 + 60.0));
        assert_eq!(now.headroom, 3000.0 - 2440.0);
        assert_eq!(now.full_in_s, None, "2440 of 3000: never fills");
        assert_eq!(get(&w, "server_closes_first").in_use, 40.0);
        assert_eq!(get(&w, "pooling").in_use, 244.0);
        assert_eq!(get(&w, "more_sources").capacity, 6000);
        // A per-socket range only narrows the namespace's: no port gained, and it says so.
        let per_socket = get(&w, "ip_local_port_range_per_socket");
        assert_eq!((per_socket.in_use, per_socket.capacity), (now.in_use, 3000));
        assert!(per_socket.text.contains("no more ports"));
        assert_eq!(get(&w, "wider_range").capacity, 55296);
        // Not loopback, tw_reuse 0: reuse=1 would apply (timestamps are on).
        assert_eq!(get(&w, "tcp_tw_reuse").in_use, 80.0);
        // Application fixes first, and never tcp_tw_recycle.
        let kinds: Vec<&str> = w.iter().map(|x| x.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "now",
                "application",
                "application",
                "application",
                "capacity",
                "sysctl",
                "sysctl"
            ]
        );
        assert!(w.iter().all(|x| !x.text.contains("recycle")));
    }

    #[test]
    fn a_filling_range_says_when() {
        // 100/s held 61 s on 1000 ports: fills. 600 in use now, net growth 100 - 600/61.
        let r = row("10.0.0.1:80", 0, 600, 1000, Some(100.0));
        let now = get(&what_if(&r, &no_reuse()), "now").clone();
        assert!(now.headroom < 0.0);
        let want = (400.0_f64 / (100.0 - 600.0 / 60.0)).round();
        assert_eq!(now.full_in_s, Some(want));
        let full = row("10.0.0.1:80", 0, 1000, 1000, Some(100.0));
        assert_eq!(
            get(&what_if(&full, &no_reuse()), "now").full_in_s,
            Some(0.0)
        );
    }

    #[test]
    fn one_snapshot_estimates_the_rate_from_time_wait() {
        // Steady state of 10/s: 600 in TIME_WAIT. Loopback with the default reuse (2).
        let r = row("127.0.0.1:5000", 0, 600, 28232, None);
        let l = load(&r, &PortSpace::default()).expect("load");
        assert_eq!(l.rate_per_s, 10.0);
        assert_eq!(l.rate_from, "time_wait");
        assert_eq!(
            l.tw_hold_s, REUSE_HOLD_S,
            "loopback reuses TIME_WAIT by default"
        );
        let w = what_if(&r, &PortSpace::default());
        assert!(
            w.iter().all(|x| x.fix != "tcp_tw_reuse"),
            "already applies: {w:?}"
        );
        // Nothing measured, nothing projected.
        assert!(what_if(&row("10.0.0.1:80", 5, 0, 100, None), &no_reuse()).is_empty());
    }
}
