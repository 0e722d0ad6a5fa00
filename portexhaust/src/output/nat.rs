//! Source-NAT drops in the human output: the live line's second row, and the summary's section.
use crate::schema::{Failure, NatClient, Totals};

use super::human::human_line;

/// A `nf_nat` failure: the usual row, then where the NAT dropped it.
pub fn live(f: &Failure) -> String {
    let mut s = human_line(f);
    if let Some(n) = &f.nat {
        s.push_str(&format!(
            "\n             nat: {} -> {} dropped by the NAT in netns {} (mapped to {}{})",
            n.client,
            f.dst,
            n.router_netns,
            n.nat,
            match n.clash {
                Some(true) => ", taken by another connection",
                Some(false) => ", NOT taken: a firewall rule after srcnat?",
                None => "",
            }
        ));
    }
    s
}

fn who(c: &NatClient) -> String {
    match c.pid {
        Some(p) => format!(
            "{} ({p}{})",
            c.comm,
            c.netns.map(|n| format!(", netns {n}")).unwrap_or_default()
        ),
        None => "(client not found)".to_string(),
    }
}

/// "Source NAT drops:" with one block per NAT namespace, destination and NAT address; empty
/// when there were none.
pub fn summary(s: &Totals) -> String {
    if s.nat.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nSource NAT drops (SYNs a NAT one hop away dropped: no free source port):\n",
    );
    for e in &s.nat {
        let range = match (&e.range, e.in_use) {
            (Some(r), Some(u)) => format!(
                "; NAT ports {}-{} ({}): {u}/{} in use ({:.0}%)",
                r.lo,
                r.hi,
                r.source,
                u64::from(r.hi - r.lo) + 1,
                e.utilisation.unwrap_or(0.0) * 100.0
            ),
            (None, Some(u)) => format!("; {u} NAT ports in use (range unknown)"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{} {} via {} (NAT netns {}): {} dropped{}{}\n",
            e.proto.name(),
            e.dst,
            e.nat_addr,
            e.router_netns,
            e.drops,
            e.insert_failed_delta
                .map(|d| format!(" (its insert_failed rose by {d})"))
                .unwrap_or_default(),
            range
        ));
        if let Some(d) = e.insert_failed_delta
            && d < e.drops
        {
            out.push_str(&format!(
                "  note: only {d} of these were conntrack insert failures: the others were \
                 dropped after srcnat by something else (a firewall rule in POSTROUTING?)\n"
            ));
        }
        let failing: Vec<String> = e
            .failers
            .iter()
            .map(|c| format!("{} x{}", who(c), c.count))
            .collect();
        out.push_str(&format!("  failing: {}\n", failing.join(", ")));
        if !e.holders.is_empty() {
            let holding: Vec<String> = e
                .holders
                .iter()
                .map(|c| format!("{} x{}", who(c), c.count))
                .collect();
            out.push_str(&format!(
                "  holding the NAT's ports: {}\n",
                holding.join(", ")
            ));
        }
    }
    out
}
