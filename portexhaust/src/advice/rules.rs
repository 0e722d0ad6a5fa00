//! What the settings, counters and socket tables of one network namespace mean for port
//! exhaustion, and what to do about it. Pure: the same rules serve `doctor` (live) and
//! `report` (recorded settings plus the failures of the incident).
//!
//! Fix order is deliberate: application changes first (pooling, keep-alive, closing, letting
//! the server close first), then capacity (more addresses or ports), then sysctls. Sysctls
//! treat the symptom for the whole host; the application knows why it opens connections.
//! `tcp_tw_recycle` is never recommended: it broke clients behind NAT and is gone since 4.12.
use serde::Serialize;

use crate::{
    sysctl::{NetSysctls, PortRange, TcpExtCounters},
    usage::DestRow,
};

/// TIME_WAIT length: `TCP_TIMEWAIT_LEN` (60 s) is a compile-time constant of the kernel.
pub const TIME_WAIT_S: u64 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// Where a fix is applied. The order of the variants is the order fixes are listed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FixKind {
    Application,
    Capacity,
    Sysctl,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fix {
    pub kind: FixKind,
    pub text: String,
    /// A command to run, for sysctl fixes (runtime only: persist it in /etc/sysctl.d/).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier for scripts, e.g. `tcp_tw_reuse` or `destination`.
    pub id: String,
    pub severity: Severity,
    pub title: String,
    pub detail: String,
    pub fixes: Vec<Fix>,
}

/// A process holding TCP sockets bound to a port of the range but not connected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BindHolder {
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
    /// One of the bound addresses, for the message.
    pub example: String,
}

/// What a record says happened (report only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// connect() EADDRNOTAVAIL.
    pub connect_failures: u64,
    /// bind(port 0) EADDRINUSE.
    pub bind_failures: u64,
    /// UDP autobind EAGAIN.
    pub udp_failures: u64,
}

/// Everything known about one namespace. `None` means "could not be seen", which is reported
/// as such rather than as "fine".
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub sysctls: &'a NetSysctls,
    pub counters: Option<&'a TcpExtCounters>,
    pub destinations: &'a [DestRow],
    /// TIME_WAIT sockets in the namespace, all addresses.
    pub time_wait_total: Option<u64>,
    pub bind_holders: Option<&'a [BindHolder]>,
    pub evidence: Option<&'a Evidence>,
}

static UNKNOWN: NetSysctls = NetSysctls {
    ip_local_port_range: None,
    ip_local_reserved_ports: None,
    tcp_tw_reuse: None,
    tcp_fin_timeout: None,
    tcp_max_tw_buckets: None,
    tcp_timestamps: None,
    tcp_tw_recycle: None,
};

/// Nothing known: every rule says so rather than guessing.
impl Default for Inputs<'_> {
    fn default() -> Self {
        Self {
            sysctls: &UNKNOWN,
            counters: None,
            destinations: &[],
            time_wait_total: None,
            bind_holders: None,
            evidence: None,
        }
    }
}

fn app(text: impl Into<String>) -> Fix {
    Fix {
        kind: FixKind::Application,
        text: text.into(),
        command: None,
    }
}
fn capacity(text: impl Into<String>) -> Fix {
    Fix {
        kind: FixKind::Capacity,
        text: text.into(),
        command: None,
    }
}
fn sysctl(text: impl Into<String>, command: impl Into<String>) -> Fix {
    Fix {
        kind: FixKind::Sysctl,
        text: text.into(),
        command: Some(command.into()),
    }
}

fn finding(
    id: &str,
    severity: Severity,
    title: String,
    detail: String,
    fixes: Vec<Fix>,
) -> Finding {
    let mut fixes = fixes;
    fixes.sort_by_key(|f| f.kind); // stable: keeps the written order within a kind
    Finding {
        id: id.to_string(),
        severity,
        title,
        detail,
        fixes,
    }
}

const POOLING: &str = "Reuse connections instead of opening one per request: a connection pool, \
                       HTTP keep-alive, or one long-lived connection per peer";
const SERVER_CLOSES: &str = "Let the server close first: the side that closes first keeps the \
                             TIME_WAIT (60 s); a client that waits for the server's FIN (or is \
                             closed by keep-alive timeouts on the server) keeps none";
const SPREAD: &str = "Spread connections over more destination IPs or ports, or more source IPs \
                      (bind(ip, 0) with IP_BIND_ADDRESS_NO_PORT set first): each (source IP, \
                      destination IP:port) pair has its own full range";
const NO_PORT: &str = "Set IP_BIND_ADDRESS_NO_PORT (Linux 4.2+) before bind(ip, 0), so the port \
                       is chosen at connect() and can be shared across destinations; or do not \
                       bind() before connect() at all";

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// The share of a row's ports that are in a state.
fn state_share(r: &DestRow, state: &str) -> f64 {
    if r.in_use == 0 {
        return 0.0;
    }
    r.by_state.get(state).copied().unwrap_or(0) as f64 / r.in_use as f64
}

fn dominant_state(r: &DestRow) -> Option<(&str, u64)> {
    r.by_state
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (s.as_str(), *n))
}

fn is_loopback(dst: &str) -> bool {
    dst.parse::<std::net::SocketAddr>()
        .map(|a| match a.ip() {
            std::net::IpAddr::V4(v) => v.is_loopback(),
            std::net::IpAddr::V6(v) => {
                v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback())
            }
        })
        .unwrap_or(false)
}

/// Destinations worth a finding: half the range or more in use.
const DEST_WARN: f64 = 0.5;
const DEST_CRIT: f64 = 0.9;
const DEST_MAX: usize = 10;

fn range_rule(range: Option<PortRange>, out: &mut Vec<Finding>) {
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

fn reserved_rule(range: Option<PortRange>, s: &NetSysctls, out: &mut Vec<Finding>) {
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

fn recycle_rule(s: &NetSysctls, out: &mut Vec<Finding>) {
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

fn reuse_rules(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    // Destinations where TIME_WAIT holds half the range or more.
    let tw_heavy: Vec<&DestRow> = rows
        .iter()
        .filter(|r| r.range_size > 0 && r.time_wait() as f64 >= DEST_WARN * r.range_size as f64)
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
                    tw_heavy[0].range_size
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

fn fin_timeout_rule(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    let Some(t) = s.tcp_fin_timeout else { return };
    let fw2: u64 = rows
        .iter()
        .map(|r| r.by_state.get("FIN_WAIT2").copied().unwrap_or(0))
        .sum();
    let busiest = rows.iter().max_by(|a, b| {
        state_share(a, "FIN_WAIT2")
            .partial_cmp(&state_share(b, "FIN_WAIT2"))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let heavy = busiest.filter(|r| {
        r.range_size > 0
            && r.by_state.get("FIN_WAIT2").copied().unwrap_or(0) as f64 >= 0.1 * r.range_size as f64
    });
    let note = "It bounds FIN_WAIT2 of sockets the application already closed; it does not \
                shorten TIME_WAIT, which is fixed at 60 s. Lowering it is no TIME_WAIT fix.";
    match heavy {
        Some(r) => out.push(finding(
            "tcp_fin_timeout",
            Severity::Warning,
            format!(
                "{fw2} sockets wait in FIN_WAIT2 (tcp_fin_timeout={t} s), {} of them to {}",
                r.by_state.get("FIN_WAIT2").copied().unwrap_or(0),
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

fn tw_buckets_rule(
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

fn counter_rules(c: Option<&TcpExtCounters>, out: &mut Vec<Finding>) {
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

fn destination_rules(s: &NetSysctls, rows: &[DestRow], out: &mut Vec<Finding>) {
    let mut hot: Vec<&DestRow> = rows.iter().filter(|r| r.utilisation >= DEST_WARN).collect();
    hot.sort_by(|a, b| {
        b.utilisation
            .partial_cmp(&a.utilisation)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.dst.cmp(&b.dst))
    });
    for r in hot.into_iter().take(DEST_MAX) {
        let severity = if r.utilisation >= DEST_CRIT {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let states = r
            .by_state
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut fixes = Vec::new();
        match dominant_state(r).map(|(st, _)| st) {
            Some("TIME_WAIT") => {
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
            Some("CLOSE_WAIT") => fixes.push(app(
                "The application does not close() connections the peer has closed: a socket \
                 leak; close them",
            )),
            Some("ESTABLISHED") => fixes.push(app(
                "Connections are held open: bound the pool size and close idle or leaked \
                 connections",
            )),
            Some("SYN_SENT") => fixes.push(app(
                "The peer does not answer: time out connect() sooner and back off",
            )),
            _ => fixes.push(app(POOLING)),
        }
        fixes.push(capacity(SPREAD));
        fixes.push(sysctl(
            "Widen the range",
            "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"",
        ));
        let from = r.src.as_deref().unwrap_or("?");
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
                r.range_size,
                pct(r.utilisation)
            ),
            detail,
            fixes,
        ));
    }
}

fn bind_rule(holders: Option<&[BindHolder]>, out: &mut Vec<Finding>) {
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

fn evidence_rules(e: Option<&Evidence>, out: &mut Vec<Finding>) {
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

/// Every finding for one namespace, worst first (fixes: application, capacity, sysctl).
pub fn audit(i: &Inputs<'_>) -> Vec<Finding> {
    let range = i.sysctls.range();
    let mut out = Vec::new();
    evidence_rules(i.evidence, &mut out);
    destination_rules(i.sysctls, i.destinations, &mut out);
    recycle_rule(i.sysctls, &mut out);
    range_rule(range, &mut out);
    reserved_rule(range, i.sysctls, &mut out);
    reuse_rules(i.sysctls, i.destinations, &mut out);
    tw_buckets_rule(i.sysctls, range, i.time_wait_total, &mut out);
    counter_rules(i.counters, &mut out);
    fin_timeout_rule(i.sysctls, i.destinations, &mut out);
    if i.evidence.is_none() {
        bind_rule(i.bind_holders, &mut out);
    } else if let Some(h) = i.bind_holders {
        bind_rule(Some(h), &mut out);
    }
    // Stable: rules above are already in a sensible order within a severity.
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        nsinfo::{NsCensus, NsSysctls},
        sockdiag::SockRow,
        usage::destination_rows,
    };
    use std::path::Path;

    fn fixture(name: &str) -> NetSysctls {
        NetSysctls::read_from(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/sysctl")
                .join(name),
        )
    }

    /// The destination rows of these sockets in a namespace with settings `s`.
    fn rows(s: &NetSysctls, sockets: Vec<SockRow>) -> Vec<DestRow> {
        destination_rows(&[NsCensus {
            netns: 1,
            sysctls: NsSysctls::from(s),
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
                    "TIME_WAIT",
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
        assert!(
            get(&f, "bind_eaddrinuse").fixes[0]
                .text
                .contains("IP_BIND_ADDRESS_NO_PORT")
        );
        assert!(get(&f, "udp_autobind_eagain").title.contains("EAGAIN"));
    }

    #[test]
    fn established_and_close_wait_destinations_get_their_own_advice() {
        let s = fixture("tiny");
        let mk = |state: &str, dport: u16| -> Vec<SockRow> {
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
        let mut socks = mk("ESTABLISHED", 80);
        socks.extend(mk("CLOSE_WAIT", 81));
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
}
