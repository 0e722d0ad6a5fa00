//! `portexhaust doctor`: audit the network namespace it runs in, now, and say what to fix.
//!
//! It reads the settings (`/proc/sys/net/ipv4`), the TIME_WAIT counters (`/proc/net/netstat`),
//! the sockets per destination (sock_diag, grouped as `trace` and `top` group them), and, as
//! root, looks for sockets bound before connect(). To audit another namespace (a container), run it there:
//! `nsenter --net=/proc/PID/ns/net portexhaust doctor`.
pub mod bindscan;
pub mod explain;
pub mod rules;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    clock::rfc3339,
    nsinfo::NsCensus,
    procinfo::netns_of,
    sockdiag::{SockRow, dump_tcp_listeners, state_name},
    sysctl::{NetSysctls, PortRange, TcpExtCounters},
    usage::{DestRow, busiest, destination_rows},
};
pub use explain::Topic;
pub use rules::{BindHolder, Evidence, Finding, Fix, FixKind, Inputs, Severity, audit};

/// Destinations listed in the output.
const TOP_DESTINATIONS: usize = 20;

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Explain a setting instead of auditing: tcp_tw_recycle, tcp_tw_reuse, tcp_fin_timeout,
    /// tcp_max_tw_buckets, ip_local_port_range, ip_local_reserved_ports, tcp_timestamps,
    /// IP_BIND_ADDRESS_NO_PORT, time_wait.
    #[arg(long, value_enum, value_name = "TOPIC", hide_possible_values = true)]
    pub explain: Option<Topic>,
}

/// The audit of one namespace, as `doctor --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Audit {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ts: String,
    pub host: Option<String>,
    pub kernel: Option<String>,
    pub netns: Option<u64>,
    pub sysctls: NetSysctls,
    pub range: Option<PortRange>,
    pub counters: Option<TcpExtCounters>,
    /// Sockets per TCP state in the namespace.
    pub states: BTreeMap<String, u64>,
    /// Busiest destinations first.
    pub destinations: Vec<DestRow>,
    /// None: could not be inspected (not root).
    pub bind_holders: Option<Vec<BindHolder>>,
    pub worst: Severity,
    pub findings: Vec<Finding>,
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sockets per TCP state, all addresses (for `tcp_max_tw_buckets`, which counts every
/// TIME_WAIT socket of the namespace).
fn state_totals<'a>(sockets: impl Iterator<Item = &'a SockRow>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in sockets {
        *out.entry(state_name(s.state).to_string()).or_default() += 1;
    }
    out
}

/// Audit the calling thread's network namespace.
pub fn gather() -> Audit {
    let netns = netns_of(std::process::id());
    let sysctls = NetSysctls::read_current();
    let range = sysctls.range();
    let counters = TcpExtCounters::read_current();
    // The sock_diag census of this namespace, as trace and top take it; the listeners it leaves
    // out count in the per-state totals only.
    let census = NsCensus::here(netns.unwrap_or_default(), &sysctls);
    let (states, destinations) = match (census, dump_tcp_listeners()) {
        (Ok(census), Ok(listeners)) => {
            let states = state_totals(census.sockets.iter().chain(&listeners));
            let destinations = if netns.is_some() && range.is_some() {
                destination_rows(&[census])
            } else {
                Vec::new()
            };
            (states, destinations)
        }
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("reading the socket tables: {e}");
            (BTreeMap::new(), Vec::new())
        }
    };
    let bind_holders = match (netns, range) {
        (Some(ns), Some(r)) => match bindscan::scan(ns, &r) {
            Ok(h) => Some(h),
            Err(e) => {
                log::info!("bound sockets not inspected: {e}");
                None
            }
        },
        _ => None,
    };
    let findings = audit(&Inputs {
        sysctls: &sysctls,
        counters: counters.as_ref(),
        destinations: &destinations,
        time_wait_total: Some(states.get("TIME_WAIT").copied().unwrap_or(0)),
        bind_holders: bind_holders.as_deref(),
        evidence: None,
    });
    let destinations = busiest(destinations, TOP_DESTINATIONS);
    Audit {
        kind: "doctor",
        ts: rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0),
        ),
        host: read_proc("/proc/sys/kernel/hostname"),
        kernel: read_proc("/proc/sys/kernel/osrelease"),
        netns,
        sysctls,
        range,
        counters,
        states,
        destinations,
        bind_holders,
        worst: findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok),
        findings,
    }
}

/// Word-wrap `text` to `width` columns, every line after the first indented by `indent`.
pub fn wrap(text: &str, width: usize, indent: usize) -> String {
    wrap_at(text, width, indent, indent)
}

/// Word-wrap `text` whose first line starts at column `first_col`; later lines are indented
/// by `indent`.
pub fn wrap_at(text: &str, width: usize, first_col: usize, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    let mut col = first_col;
    for (i, word) in text.split_whitespace().enumerate() {
        let w = word.chars().count();
        if i > 0 && col + 1 + w > width {
            out.push('\n');
            out.push_str(&pad);
            col = indent;
        } else if i > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += w;
    }
    out
}

/// Findings as text: problems with their fixes, then one line per check that is fine.
pub fn render_findings(findings: &[Finding]) -> String {
    let mut out = String::new();
    let (fine, todo): (Vec<&Finding>, Vec<&Finding>) =
        findings.iter().partition(|f| f.severity == Severity::Ok);
    if todo.is_empty() {
        out.push_str("Nothing to fix.\n");
    }
    for f in todo {
        let label = f.severity.name().to_uppercase();
        out.push_str(&format!("{label:<9} {}\n", wrap(&f.title, 100, 10)));
        out.push_str(&format!("          {}\n", wrap(&f.detail, 100, 10)));
        for (n, fix) in f.fixes.iter().enumerate() {
            let kind = match fix.kind {
                FixKind::Application => "application",
                FixKind::Capacity => "capacity",
                FixKind::Sysctl => "sysctl",
            };
            let head = format!("          fix {} ({kind}): ", n + 1);
            out.push_str(&head);
            out.push_str(&wrap_at(&fix.text, 100, head.len(), 14));
            out.push('\n');
            if let Some(c) = &fix.command {
                out.push_str(&format!("              $ {c}\n"));
            }
        }
        out.push('\n');
    }
    if !fine.is_empty() {
        out.push_str("Fine:\n");
        for f in fine {
            out.push_str(&format!("  ok  {}\n", f.title));
        }
    }
    out
}

pub fn render_text(a: &Audit) -> String {
    let mut out = format!(
        "portexhaust doctor: host {}, kernel {}, network namespace {}, {}\n",
        a.host.as_deref().unwrap_or("?"),
        a.kernel.as_deref().unwrap_or("?"),
        a.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        a.ts
    );
    if let Some(r) = a.range {
        out.push_str(&format!(
            "range {}-{} ({} usable), {} TIME_WAIT socket(s) in this namespace\n",
            r.lo,
            r.hi,
            r.usable,
            a.states.get("TIME_WAIT").copied().unwrap_or(0)
        ));
    }
    out.push('\n');
    out.push_str(&render_findings(&a.findings));
    if !a.destinations.is_empty() {
        out.push_str("\nBusiest destinations (ports of the range in use):\n");
        out.push_str(&dest_table(&a.destinations));
        out.push('\n');
    }
    out
}

/// Destination rows as a text table.
pub fn dest_table(rows: &[DestRow]) -> String {
    use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(["SOURCE", "DESTINATION", "IN USE", "RANGE", "USED", "STATES"]);
    for r in rows {
        t.add_row(vec![
            Cell::new(r.src.as_deref().unwrap_or("-")),
            Cell::new(&r.dst),
            Cell::new(r.in_use).set_alignment(CellAlignment::Right),
            Cell::new(r.range_size).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}%", r.utilisation * 100.0)).set_alignment(CellAlignment::Right),
            Cell::new(
                r.by_state
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ]);
    }
    t.to_string()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run `doctor`: the output to print on stdout.
pub fn run(args: &DoctorArgs) -> String {
    if let Some(t) = args.explain {
        let text = explain::text(t);
        return if args.json {
            let topic = clap::ValueEnum::to_possible_value(&t)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            serde_json::json!({"type": "explain", "topic": topic, "text": text}).to_string()
        } else {
            text.to_string()
        };
    }
    let a = gather();
    if args.json {
        serde_json::to_string(&a).unwrap_or_default()
    } else {
        render_text(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_with_indent() {
        let w = wrap("aaa bbb ccc ddd", 9, 2);
        assert_eq!(w, "aaa bbb\n  ccc ddd");
        assert_eq!(wrap("", 10, 0), "");
        assert_eq!(wrap_at("aaa bbb ccc", 9, 5, 1), "aaa\n bbb ccc");
    }

    #[test]
    fn live_audit_of_this_namespace_is_complete_json() {
        let a = gather();
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&a).expect("json")).expect("parse");
        assert_eq!(v["type"], "doctor");
        assert!(v["findings"].as_array().is_some_and(|f| !f.is_empty()));
        assert!(v["sysctls"]["ip_local_port_range"].is_array());
        let text = render_text(&a);
        assert!(text.contains("portexhaust doctor: host"), "{text}");
    }

    #[test]
    fn explain_recycle_in_text_and_json() {
        let t = run(&DoctorArgs {
            json: false,
            explain: Some(Topic::TcpTwRecycle),
        });
        assert!(t.contains("4.12"));
        let j: serde_json::Value = serde_json::from_str(&run(&DoctorArgs {
            json: true,
            explain: Some(Topic::TcpTwRecycle),
        }))
        .expect("json");
        assert_eq!(j["type"], "explain");
        assert_eq!(j["topic"], "tcp_tw_recycle");
        assert!(j["text"].as_str().is_some_and(|t| t.contains("NAT")));
    }
}
