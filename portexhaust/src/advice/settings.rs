//! The rules about settings and counters: the range, reserved ports, tcp_tw_reuse,
//! tcp_fin_timeout, tcp_max_tw_buckets and the TcpExt counters.
use portexhaust_common::TcpState;

use super::{
    DEST_WARN, Finding, POOLING, SERVER_CLOSES, SPREAD, Severity, TIME_WAIT_S, app, capacity,
    finding, is_loopback, pct, range_of, size_text, state_share, sysctl,
};
use crate::schema::{DestRow, NetSysctls, PortRange, TcpExtCounters};

pub(super) fn range_rule(range: Option<PortRange>, out: &mut Vec<Finding>) {
    let Some(r) = range else {
        out.push(finding(
            "ip_local_port_range",
            Severity::Info,
            "ip_local_port_range could not be read".into(),
            "Without the range, the per-destination limits below are unknown.".into(),
            vec![],
        ));
        return;
    };
    if r.size == 0 {
        out.push(finding(
            "ip_local_port_range",
            Severity::Critical,
            format!("ip_local_port_range {} {} is empty", r.lo, r.hi),
            "No automatic port can be chosen: every connect() without bind() fails.".into(),
            vec![sysctl(
                "Restore the kernel default range",
                "sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"",
            )],
        ));
        return;
    }
    let per_s = r.usable as f64 / TIME_WAIT_S as f64;
    // "About", rounded down: 28232 / 60 = 470.5 is "about 470", as people quote it.
    let per_s = if per_s >= 10.0 {
        format!("{:.0}", per_s.floor())
    } else {
        format!("{per_s:.1}")
    };
    let severity = match r.usable {
        0..1024 => Severity::Critical,
        1024..8192 => Severity::Warning,
        _ => Severity::Ok,
    };
    let detail = format!(
        "Each (source IP, destination IP:port) pair can hold at most {} connections at once, \
         TIME_WAIT included. TIME_WAIT lasts {TIME_WAIT_S} s (TCP_TIMEWAIT_LEN, not tunable), so \
         one source IP can open about {per_s} new connections per second to one destination \
         without TIME_WAIT reuse.",
        r.usable
    );
    let mut fixes = vec![];
    if severity > Severity::Ok {
        fixes.push(app(POOLING));
        fixes.push(capacity(SPREAD));
        fixes.push(sysctl(
            "Widen the range (keep listening ports out of it with ip_local_reserved_ports)",
            "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"",
        ));
    }
    out.push(finding(
        "ip_local_port_range",
        severity,
        format!(
            "Ephemeral range {}-{}: {} usable ports per destination",
            r.lo, r.hi, r.usable
        ),
        detail,
        fixes,
    ));
}

pub(super) fn reserved_rule(range: Option<PortRange>, s: &NetSysctls, out: &mut Vec<Finding>) {
    let Some(r) = range else { return };
    if r.reserved_in_range == 0 || r.size == 0 {
        return;
    }
    let share = r.reserved_in_range as f64 / r.size as f64;
    let severity = if share >= 0.25 {
        Severity::Warning
    } else {
        Severity::Info
    };
    out.push(finding(
        "ip_local_reserved_ports",
        severity,
        format!(
            "{} ports of the range ({}) are reserved",
            r.reserved_in_range,
            pct(share)
        ),
        format!(
            "ip_local_reserved_ports = {:?}: connect() and bind(0) skip these ports, so only {} \
             of {} are usable.",
            s.ip_local_reserved_ports.as_deref().unwrap_or(""),
            r.usable,
            r.size
        ),
        vec![sysctl(
            "Reserve only ports that a local service actually listens on",
            "sysctl -w net.ipv4.ip_local_reserved_ports=\"<ports services listen on>\"",
        )],
    ));
}

pub(super) fn recycle_rule(s: &NetSysctls, out: &mut Vec<Finding>) {
    if s.tcp_tw_recycle.is_some_and(|v| v != 0) {
        out.push(finding(
            "tcp_tw_recycle",
            Severity::Critical,
            "tcp_tw_recycle is on: it drops connections from clients behind NAT".into(),
            "tcp_tw_recycle rejects SYNs whose TCP timestamp is lower than the last one seen \
             from the same IP, which breaks every client behind NAT or a load balancer. It was \
             removed in Linux 4.12; its 'fix' for TIME_WAIT is not one."
                .into(),
            vec![
                app(SERVER_CLOSES),
                sysctl("Turn it off", "sysctl -w net.ipv4.tcp_tw_recycle=0"),
                sysctl(
                    "For outgoing connections use TIME_WAIT reuse instead",
                    "sysctl -w net.ipv4.tcp_tw_reuse=1",
                ),
            ],
        ));
    }
}

pub(super) fn reuse_rules(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    // Destinations where TIME_WAIT holds half the range or more.
    let tw_heavy: Vec<&DestRow> = rows
        .iter()
        .filter(|r| range_of(r).is_some_and(|n| r.time_wait() as f64 >= DEST_WARN * n as f64))
        .collect();
    let tw_heavy_remote = tw_heavy.iter().filter(|r| !is_loopback(&r.dst)).count();
    match s.tcp_tw_reuse {
        Some(0) => {
            let severity = if tw_heavy.is_empty() {
                Severity::Warning
            } else {
                Severity::Critical
            };
            let extra = if tw_heavy.is_empty() {
                String::new()
            } else {
                format!(
                    " Right now {} destination(s) have half their range or more in TIME_WAIT \
                     (e.g. {}: {} of {}).",
                    tw_heavy.len(),
                    tw_heavy[0].dst,
                    tw_heavy[0].time_wait(),
                    size_text(tw_heavy[0].range_size)
                )
            };
            out.push(finding(
                "tcp_tw_reuse",
                severity,
                "tcp_tw_reuse=0: ports in TIME_WAIT are never reused for new connections".into(),
                format!(
                    "Every connection this host closes first keeps its port for {TIME_WAIT_S} s, \
                     even on loopback.{extra}"
                ),
                vec![
                    app(SERVER_CLOSES),
                    app(POOLING),
                    sysctl(
                        "Allow outgoing connections to reuse a TIME_WAIT port after 1 s (needs TCP \
                         timestamps; safe for outgoing connections, unlike tcp_tw_recycle)",
                        "sysctl -w net.ipv4.tcp_tw_reuse=1",
                    ),
                ],
            ));
        }
        Some(2) => {
            let (severity, detail) = if tw_heavy_remote > 0 {
                (
                    Severity::Warning,
                    format!(
                        "{tw_heavy_remote} non-loopback destination(s) have half their range or \
                         more in TIME_WAIT, and reuse does not apply to them."
                    ),
                )
            } else {
                (
                    Severity::Info,
                    "The kernel default: only connections over loopback reuse TIME_WAIT ports."
                        .to_string(),
                )
            };
            let fixes = if severity > Severity::Info {
                vec![
                    app(SERVER_CLOSES),
                    app(POOLING),
                    sysctl(
                        "Allow reuse for all outgoing connections",
                        "sysctl -w net.ipv4.tcp_tw_reuse=1",
                    ),
                ]
            } else {
                vec![]
            };
            out.push(finding(
                "tcp_tw_reuse",
                severity,
                "tcp_tw_reuse=2: TIME_WAIT reuse on loopback only".into(),
                detail,
                fixes,
            ));
        }
        Some(1) => out.push(finding(
            "tcp_tw_reuse",
            Severity::Ok,
            "tcp_tw_reuse=1: outgoing connections reuse TIME_WAIT ports after 1 s".into(),
            "Reuse needs TCP timestamps on both ends.".into(),
            vec![],
        )),
        Some(v) => out.push(finding(
            "tcp_tw_reuse",
            Severity::Info,
            format!("tcp_tw_reuse={v} is not a documented value"),
            "Documented: 0 (never), 1 (outgoing), 2 (loopback only, the default).".into(),
            vec![],
        )),
        None => {}
    }
    if matches!(s.tcp_tw_reuse, Some(1 | 2)) && s.tcp_timestamps == Some(0) {
        out.push(finding(
            "tcp_timestamps",
            Severity::Warning,
            "tcp_timestamps=0: TIME_WAIT reuse cannot work".into(),
            "tcp_twsk_unique() reuses a TIME_WAIT port only when the old connection carried \
             timestamps, so tcp_tw_reuse has no effect."
                .into(),
            vec![sysctl(
                "Turn timestamps back on",
                "sysctl -w net.ipv4.tcp_timestamps=1",
            )],
        ));
    }
}

pub(super) fn fin_timeout_rule(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    let Some(t) = s.tcp_fin_timeout else { return };
    let fw2: u64 = rows.iter().map(|r| r.state(TcpState::FinWait2)).sum();
    let busiest = rows.iter().max_by(|a, b| {
        state_share(a, TcpState::FinWait2)
            .partial_cmp(&state_share(b, TcpState::FinWait2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let heavy = busiest.filter(|r| {
        range_of(r).is_some_and(|n| r.state(TcpState::FinWait2) as f64 >= 0.1 * n as f64)
    });
    let note = "It bounds FIN_WAIT2 of sockets the application already closed; it does not \
                shorten TIME_WAIT, which is fixed at 60 s. Lowering it is no TIME_WAIT fix.";
    match heavy {
        Some(r) => out.push(finding(
            "tcp_fin_timeout",
            Severity::Warning,
            format!(
                "{fw2} sockets wait in FIN_WAIT2 (tcp_fin_timeout={t} s), {} of them to {}",
                r.state(TcpState::FinWait2),
                r.dst
            ),
            format!("The peer does not close its side. {note}"),
            vec![
                app("Find out why the peer does not close (a server that keeps idle connections open after the client's FIN)"),
                sysctl(
                    "Bound orphaned FIN_WAIT2 sockets sooner",
                    "sysctl -w net.ipv4.tcp_fin_timeout=30",
                ),
            ],
        )),
        None => out.push(finding(
            "tcp_fin_timeout",
            if t > 60 { Severity::Info } else { Severity::Ok },
            format!("tcp_fin_timeout={t} s"),
            note.into(),
            vec![],
        )),
    }
}

pub(super) fn tw_buckets_rule(
    s: &NetSysctls,
    range: Option<PortRange>,
    tw_total: Option<u64>,
    out: &mut Vec<Finding>,
) {
    let Some(b) = s.tcp_max_tw_buckets else {
        return;
    };
    let b = b.max(0) as u64;
    if let Some(tw) = tw_total
        && b > 0
        && tw as f64 >= 0.9 * b as f64
    {
        out.push(finding(
            "tcp_max_tw_buckets",
            Severity::Warning,
            format!("{tw} TIME_WAIT sockets, tcp_max_tw_buckets is {b}"),
            "Beyond tcp_max_tw_buckets the kernel destroys new TIME_WAIT sockets at once \
             (TCPTimeWaitOverflow, \"time wait bucket table overflow\"): ports come back, but \
             delayed segments of old connections can corrupt new ones."
                .into(),
            vec![
                app(POOLING),
                app(SERVER_CLOSES),
                sysctl(
                    "Raise the cap (memory: about 200 bytes per TIME_WAIT socket)",
                    format!(
                        "sysctl -w net.ipv4.tcp_max_tw_buckets={}",
                        (b * 2).max(262144)
                    ),
                ),
            ],
        ));
    } else if let Some(r) = range
        && b < r.usable
    {
        out.push(finding(
            "tcp_max_tw_buckets",
            Severity::Info,
            format!(
                "tcp_max_tw_buckets={b} is below the range ({} ports)",
                r.usable
            ),
            "It caps TIME_WAIT for the whole namespace: past it TIME_WAIT is skipped, trading \
             protocol safety for ports. TIME_WAIT reuse (tcp_tw_reuse=1) is the safer lever."
                .into(),
            vec![],
        ));
    } else {
        out.push(finding(
            "tcp_max_tw_buckets",
            Severity::Ok,
            format!(
                "tcp_max_tw_buckets={b}{}",
                tw_total
                    .map(|t| format!(" ({t} TIME_WAIT now)"))
                    .unwrap_or_default()
            ),
            "TIME_WAIT sockets are far from the cap.".into(),
            vec![],
        ));
    }
}

pub(super) fn counter_rules(c: Option<&TcpExtCounters>, out: &mut Vec<Finding>) {
    let Some(c) = c else { return };
    if let Some(n) = c.tw_overflow.filter(|n| *n > 0) {
        out.push(finding(
            "TCPTimeWaitOverflow",
            Severity::Warning,
            format!("The kernel skipped TIME_WAIT {n} times (TCPTimeWaitOverflow)"),
            "tcp_max_tw_buckets was reached: this namespace closes connections faster than \
             TIME_WAIT can hold them."
                .into(),
            vec![
                app(POOLING),
                app(SERVER_CLOSES),
                sysctl(
                    "Raise the TIME_WAIT cap",
                    "sysctl -w net.ipv4.tcp_max_tw_buckets=262144",
                ),
            ],
        ));
    }
    if let Some(n) = c.tw_recycled.filter(|n| *n > 0) {
        out.push(finding(
            "TWRecycled",
            Severity::Info,
            format!("TIME_WAIT ports were reused {n} times (TWRecycled)"),
            "tcp_tw_reuse is doing work here: without it these connect() calls would have \
             needed fresh ports."
                .into(),
            vec![],
        ));
    }
}
