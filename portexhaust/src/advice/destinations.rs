//! The rules about what is happening: destinations whose range fills, sockets bound before
//! connect(), and the failures a record saw.
use portexhaust_common::TcpState;

use super::{
    BindHolder, BoundConnects, Evidence, Finding, NO_PORT, POOLING, SERVER_CLOSES, SPREAD,
    Severity, app, capacity, dominant_state, finding, pct, size_text, sysctl,
};
use crate::schema::{DestRow, NetSysctls};

use super::{DEST_CRIT, DEST_MAX, DEST_WARN};

pub(super) fn destination_rules(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    let util = |r: &DestRow| r.utilisation.unwrap_or(0.0);
    let mut hot: Vec<&DestRow> = rows.iter().filter(|r| util(r) >= DEST_WARN).collect();
    hot.sort_by(|a, b| {
        util(b)
            .partial_cmp(&util(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.dst.cmp(&b.dst))
    });
    for r in hot.into_iter().take(DEST_MAX) {
        let severity = if util(r) >= DEST_CRIT {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let states = r
            .by_state
            .iter()
            .map(|(k, v)| format!("{v} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut fixes = Vec::new();
        match dominant_state(r).map(|(st, _)| st) {
            Some(TcpState::TimeWait) => {
                fixes.push(app(
                    "This host closes these connections first, so it keeps their TIME_WAIT: let \
                     the server close first (or keep the connections open and reuse them)",
                ));
                fixes.push(app(POOLING));
                if s.tcp_tw_reuse != Some(1) {
                    fixes.push(sysctl(
                        "Reuse TIME_WAIT ports for outgoing connections",
                        "sysctl -w net.ipv4.tcp_tw_reuse=1",
                    ));
                }
            }
            Some(TcpState::CloseWait) => fixes.push(app(
                "The application does not close() connections the peer has closed: a socket \
                 leak; close them",
            )),
            Some(TcpState::Established) => fixes.push(app(
                "Connections are held open: bound the pool size and close idle or leaked \
                 connections",
            )),
            Some(TcpState::SynSent) => fixes.push(app(
                "The peer does not answer: time out connect() sooner and back off",
            )),
            _ => fixes.push(app(POOLING)),
        }
        fixes.push(capacity(SPREAD));
        fixes.push(sysctl(
            "Widen the range",
            "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"",
        ));
        let from = r.src.map_or_else(|| "?".to_string(), |a| a.to_string());
        let mut detail = format!("States: {states}.");
        if let Some(f) = r.forecast_s {
            detail.push_str(&format!(" Forecast: full in {f:.0} s."));
        }
        out.push(finding(
            "destination",
            severity,
            format!(
                "{from} -> {} uses {} of {} ports ({})",
                r.dst,
                r.in_use,
                size_text(r.range_size),
                pct(util(r))
            ),
            detail,
            fixes,
        ));
    }
}

pub(super) fn bind_rule(holders: Option<&[BindHolder]>, out: &mut Vec<Finding>) {
    match holders {
        None => out.push(finding(
            "bind_before_connect",
            Severity::Info,
            "Bound-but-unconnected sockets could not be inspected".into(),
            "Seeing them needs root (pidfd_getfd, Linux 5.6+).".into(),
            vec![],
        )),
        Some([]) => out.push(finding(
            "bind_before_connect",
            Severity::Ok,
            "No process holds TCP sockets bound to a port of the range without connecting them"
                .into(),
            "Checked every TCP socket of this namespace not yet in the connection tables.".into(),
            vec![],
        )),
        Some(list) => {
            let total: u64 = list.iter().map(|h| h.sockets).sum();
            let who = list
                .iter()
                .take(5)
                .map(|h| format!("{} (pid {}): {}", h.comm, h.pid, h.sockets))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(finding(
                "bind_before_connect",
                Severity::Warning,
                format!("{total} TCP sockets hold a port of the range without being connected"),
                format!(
                    "{who}. A socket bound before connect() takes its port exclusively for every \
                     destination (EADDRINUSE at bind when the range is used up), unless \
                     IP_BIND_ADDRESS_NO_PORT is set."
                ),
                vec![app(NO_PORT)],
            ));
        }
    }
}

pub(super) fn evidence_rules(e: Option<&Evidence>, out: &mut Vec<Finding>) {
    let Some(e) = e else { return };
    if e.connect_failures > 0 {
        out.push(finding(
            "connect_eaddrnotavail",
            Severity::Critical,
            format!(
                "connect() failed {} times with EADDRNOTAVAIL: no free local port",
                e.connect_failures
            ),
            "Every port of the range was taken for the destination (held, or in TIME_WAIT).".into(),
            vec![app(POOLING), app(SERVER_CLOSES), capacity(SPREAD)],
        ));
    }
    if e.collisions > 0 {
        out.push(finding(
            "connect_tuple_collision",
            Severity::Critical,
            format!(
                "connect() failed {} times with EADDRNOTAVAIL on sockets bound before connect(): \
                 the 4-tuple was taken",
                e.collisions
            ),
            "The range need not be full: the socket already had its local port (bind() before \
             connect(), or a fixed source port with SO_REUSEADDR/SO_REUSEPORT), and that port \
             already had a connection to the same destination. Widening the range does not help."
                .into(),
            vec![
                app(NO_PORT),
                app(
                    "If the source port is chosen by the application (SO_REUSEPORT pools, \
                     Envoy's upstream_bind_config with a port), let the kernel choose it",
                ),
            ],
        ));
    }
    if let Some(f) = bound_connects_finding(&e.bound_connects) {
        out.push(f);
    }
    if e.bind_failures > 0 {
        out.push(finding(
            "bind_eaddrinuse",
            Severity::Warning,
            format!(
                "bind(port 0) failed {} times with EADDRINUSE",
                e.bind_failures
            ),
            "A bind() before connect() takes a port exclusively, for all destinations: such \
             programs exhaust the range long before connect() alone would."
                .into(),
            vec![app(NO_PORT), app(POOLING)],
        ));
    }
    if e.udp_failures > 0 {
        out.push(finding(
            "udp_autobind_eagain",
            Severity::Warning,
            format!(
                "UDP connect()/sendto() failed {} times with EAGAIN: no free port to autobind",
                e.udp_failures
            ),
            "Each unbound UDP socket takes a port of the range on first use until it is closed."
                .into(),
            vec![app(
                "Reuse UDP sockets (one per peer or per worker) instead of one per query, and \
                 close them",
            )],
        ));
    }
}

/// Connects on sockets bound before connect() (from the call-site counts): each takes its
/// port from the whole range. `report`, `doctor --watch` and the trace summary say it alike.
pub fn bound_connects_finding(list: &[BoundConnects]) -> Option<Finding> {
    let top = list.first()?;
    let total: u64 = list.iter().map(|b| b.connects).sum();
    let who = list
        .iter()
        .take(3)
        .map(|b| {
            let site = b
                .site
                .as_deref()
                .map(|s| format!(" from {s}"))
                .unwrap_or_default();
            format!(
                "{} (pid {}) to {}: {} of {} connects{site}",
                b.comm, b.pid, b.dst, b.connects, b.of
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(finding(
        "connects_on_bound_sockets",
        if top.connects >= 100 {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!("{total} connects were made on sockets bound before connect()"),
        format!(
            "{who}. An unbound connect() shares each local port among all destinations; a \
                 socket bound first (bind() to pick a source address, SO_REUSEADDR source ports, \
                 Envoy's upstream_bind_config) takes its port from the whole range for every \
                 destination at once, so such clients run out of ports far sooner."
        ),
        vec![
            app(NO_PORT),
            app(
                "Or do not bind() at all where only the source address matters: the route's \
                     source is chosen anyway; with Envoy, drop upstream_bind_config's port or \
                     set its IP_BIND_ADDRESS_NO_PORT socket option",
            ),
        ],
    ))
}
