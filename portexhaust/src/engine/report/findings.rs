//! The findings of a report: the advice's audit of each namespace's recorded settings, with
//! the evidence of its failures and its busiest destinations.
use std::collections::BTreeMap;

use super::{OnHost, RowOut, ScopedFinding};
use crate::{
    advice::{Evidence, Finding, Inputs, Severity, audit},
    schema::{DestRow, NatEntry, NetSysctls},
};

/// Findings per namespace: recorded settings, the busiest rows seen there, and what failed.
pub(super) fn findings(
    settings: &BTreeMap<(String, Option<u64>), NetSysctls>,
    evidence: &BTreeMap<(String, Option<u64>), Evidence>,
    dest_rows: &[RowOut],
    nat: &[OnHost<NatEntry>],
) -> Vec<ScopedFinding> {
    let mut findings = Vec::new();
    let mut scopes: Vec<(String, Option<u64>)> = settings.keys().cloned().collect();
    // The NAT's namespace (a router's, or the host's) has findings of its own.
    let nat_scopes = nat
        .iter()
        .map(|n| (n.host.clone(), Some(n.item.router_netns)));
    for k in evidence.keys().cloned().chain(nat_scopes) {
        if !scopes.contains(&k) {
            scopes.push(k);
        }
    }
    let unknown = NetSysctls::default();
    for (host, ns) in &scopes {
        let key = (host.clone(), *ns);
        let sys = settings.get(&key).unwrap_or(&unknown);
        let ns_rows: Vec<DestRow> = dest_rows
            .iter()
            .filter(|r| &r.host == host && (r.row.netns == *ns || r.row.netns.is_none()))
            .map(|r| r.row.clone())
            .collect();
        let ev = evidence.get(&key);
        let ns_nat: Vec<NatEntry> = nat
            .iter()
            .filter(|n| &n.host == host && Some(n.item.router_netns) == *ns)
            .map(|n| n.item.clone())
            .collect();
        // A namespace with neither failures nor busy destinations gets only what is wrong.
        let quiet = ev.is_none()
            && ns_nat.is_empty()
            && ns_rows.iter().all(|r| r.utilisation.unwrap_or(0.0) < 0.5);
        let recorded = settings.contains_key(&key);
        // (A NAT's namespace without failures of its own needs no settings to be judged.)
        if !recorded && ev.is_some() {
            findings.push(ScopedFinding {
                host: host.clone(),
                netns: *ns,
                finding: Finding {
                    id: "settings_not_recorded".into(),
                    severity: Severity::Info,
                    title: "The settings of this namespace were not recorded".into(),
                    detail: "Its processes exited before the tracer could look inside; run \
                             `portexhaust doctor` there (nsenter --net=/proc/PID/ns/net) to audit \
                             it."
                    .into(),
                    fixes: vec![],
                },
            });
        }
        for f in audit(&Inputs {
            sysctls: sys,
            counters: None,
            destinations: &ns_rows,
            time_wait_total: None,
            bind_holders: None,
            evidence: Some(ev.unwrap_or(&Evidence::default())),
            nat: &ns_nat,
            ..Default::default()
        }) {
            if (quiet && f.severity < Severity::Warning)
                || (!recorded && f.id == "ip_local_port_range")
            {
                continue;
            }
            findings.push(ScopedFinding {
                host: host.clone(),
                netns: *ns,
                finding: f,
            });
        }
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.finding.severity));
    findings
}
