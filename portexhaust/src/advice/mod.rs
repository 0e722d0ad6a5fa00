//! What the settings, counters and socket tables of one network namespace mean for port
//! exhaustion, and what to do about it. Pure: the same rules serve `doctor` (live) and
//! `report` (recorded settings plus the failures of the incident).
//!
//! Fix order is deliberate: application changes first (pooling, keep-alive, closing, letting
//! the server close first), then capacity (more addresses or ports), then sysctls. Sysctls
//! treat the symptom for the whole host; the application knows why it opens connections.
//! `tcp_tw_recycle` is never recommended: it broke clients behind NAT and is gone since 4.12.
use serde::Serialize;

mod destinations;
pub use destinations::bound_connects_finding;
pub mod explain;
mod nat;
mod settings;

use portexhaust_common::TcpState;

use crate::schema::{ByState, DestRow, NetSysctls, PortRange, TcpExtCounters, Ts};

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
    /// connect() EADDRNOTAVAIL on a socket bound before connect(): its 4-tuple was taken.
    pub collisions: u64,
    /// SYNs a source NAT one hop away dropped for want of a free port (`--catch nat`).
    pub snat_drops: u64,
    /// Processes that connect on sockets bound before connect() (from the call-site counts),
    /// most first.
    pub bound_connects: Vec<BoundConnects>,
}

/// Connects of one process to one destination on sockets bound before connect().
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BoundConnects {
    pub pid: u32,
    pub comm: String,
    pub dst: String,
    pub connects: u64,
    /// Of all its connects to that destination.
    pub of: u64,
    /// The call site, where its stack was named.
    pub site: Option<String>,
}

impl BoundConnects {
    /// The connects of the call sites that were made on bound sockets, one per process and
    /// destination, most first.
    pub fn of_sites(sites: &[crate::schema::CallSite]) -> Vec<BoundConnects> {
        let mut acc: std::collections::BTreeMap<(u32, std::net::SocketAddr), BoundConnects> =
            std::collections::BTreeMap::new();
        for s in sites {
            let e = acc.entry((s.pid, s.dst)).or_insert_with(|| BoundConnects {
                pid: s.pid,
                comm: s.comm.clone(),
                dst: s.dst.to_string(),
                ..Default::default()
            });
            e.of += s.connects;
            e.connects += s.bound_connects;
            if s.bound_connects > 0 && e.site.is_none() && s.stack_id.is_some() {
                e.site = Some(s.label());
            }
        }
        let mut v: Vec<BoundConnects> = acc.into_values().filter(|b| b.connects > 0).collect();
        v.sort_by(|a, b| b.connects.cmp(&a.connects).then(a.pid.cmp(&b.pid)));
        v
    }
}

/// The audit of one namespace, as `doctor --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Audit {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ts: Ts,
    pub host: Option<String>,
    pub kernel: Option<String>,
    pub netns: Option<u64>,
    pub sysctls: NetSysctls,
    pub range: Option<PortRange>,
    pub counters: Option<TcpExtCounters>,
    /// Sockets per TCP state in the namespace.
    pub states: ByState,
    /// Busiest destinations first.
    pub destinations: Vec<DestRow>,
    /// None: could not be inspected (not root).
    pub bind_holders: Option<Vec<BindHolder>>,
    /// `--watch`: for how long this namespace's connects were watched, and the call sites
    /// seen meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watched_s: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<crate::schema::CallSite>,
    /// This namespace's source NAT: one entry per destination and NAT address, busiest first
    /// (the entries of the trace summary's `nat` section; drops only with `--watch`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<crate::schema::NatEntry>,
    /// conntrack's `insert_failed` and `drop` since boot (None: no conntrack here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackCounters>,
    pub worst: Severity,
    pub findings: Vec<Finding>,
}

/// conntrack's statistics of a namespace (/proc/net/stat/nf_conntrack, summed over CPUs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConntrackCounters {
    pub insert_failed: u64,
    pub drop: u64,
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
    /// The source NAT of this namespace: each destination it maps connections to, with its
    /// ports in use (conntrack) and range (nft), and the drops when watched.
    pub nat: &'a [crate::schema::NatEntry],
    /// The namespace's conntrack counters since boot: (insert_failed, drop).
    pub conntrack: Option<(u64, u64)>,
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
            nat: &[],
            conntrack: None,
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
fn state_share(r: &DestRow, state: TcpState) -> f64 {
    if r.in_use == 0 {
        return 0.0;
    }
    r.state(state) as f64 / r.in_use as f64
}

fn dominant_state(r: &DestRow) -> Option<(TcpState, u64)> {
    r.by_state
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (*s, *n))
}

fn is_loopback(dst: &std::net::SocketAddr) -> bool {
    match dst.ip() {
        std::net::IpAddr::V4(v) => v.is_loopback(),
        std::net::IpAddr::V6(v) => {
            v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback())
        }
    }
}

/// Destinations worth a finding: half the range or more in use.
const DEST_WARN: f64 = 0.5;
const DEST_CRIT: f64 = 0.9;
const DEST_MAX: usize = 10;

/// The size of a row's range, when it is known and not empty.
fn range_of(r: &DestRow) -> Option<u64> {
    r.range_size.filter(|n| *n > 0)
}

/// "N" or "?" for a range size.
fn size_text(n: Option<u64>) -> String {
    n.map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// Every finding for one namespace, worst first (fixes: application, capacity, sysctl).
pub fn audit(i: &Inputs<'_>) -> Vec<Finding> {
    let range = i.sysctls.range();
    let mut out = Vec::new();
    destinations::evidence_rules(i.evidence, &mut out);
    nat::snat_rule(i.evidence, &mut out);
    nat::nat_range_rule(i.nat, &mut out);
    nat::insert_failed_rule(i.conntrack, i.nat, i.evidence, &mut out);
    destinations::destination_rules(i.sysctls, i.destinations, &mut out);
    settings::recycle_rule(i.sysctls, &mut out);
    settings::range_rule(range, &mut out);
    settings::reserved_rule(range, i.sysctls, &mut out);
    settings::reuse_rules(i.sysctls, i.destinations, &mut out);
    settings::tw_buckets_rule(i.sysctls, range, i.time_wait_total, &mut out);
    settings::counter_rules(i.counters, &mut out);
    settings::fin_timeout_rule(i.sysctls, i.destinations, &mut out);
    if i.evidence.is_none() {
        destinations::bind_rule(i.bind_holders, &mut out);
    } else if let Some(h) = i.bind_holders {
        destinations::bind_rule(Some(h), &mut out);
    }
    // Stable: rules above are already in a sensible order within a severity.
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

#[cfg(test)]
mod tests;
