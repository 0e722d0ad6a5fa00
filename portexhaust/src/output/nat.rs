//! Source-NAT drops in the human output: the live line's second row, and the summary's section.
use comfy_table::Cell;

use crate::schema::{Failure, NatClient, NatEntry, NatRow, Totals};

use super::{
    human::human_line,
    text::{pct, right, table},
};

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
    out.push_str(&entries(&s.nat, true));
    out
}

/// One block per NAT entry: its drops (`watched`: the NAT hook counted them) and ports, who
/// failed and who holds them (the summary's section, and `doctor`'s).
pub fn entries(es: &[NatEntry], watched: bool) -> String {
    let mut out = String::new();
    for e in es {
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
            "{} {} via {} (NAT netns {}){}{}{}\n",
            e.proto.name(),
            e.dst,
            e.nat_addr,
            e.router_netns,
            if watched {
                format!(": {} dropped", e.drops)
            } else {
                String::new()
            },
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
        if !failing.is_empty() {
            out.push_str(&format!("  failing: {}\n", failing.join(", ")));
        }
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

/// The top failer or holder of a NAT row, and how many more there are.
fn first_of(cs: &[NatClient]) -> String {
    match cs {
        [] => "-".into(),
        [c] => format!("{} x{}", who(c), c.count),
        [c, rest @ ..] => format!("{} x{} (+{} more)", who(c), c.count, rest.len()),
    }
}

/// `top`'s NAT panel: one row per NAT namespace, destination and NAT address, the most drops
/// first; empty when the NAT is not watched or dropped nothing.
pub fn top_panel(rows: &[NatRow], max: usize) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut out =
        String::from("\nSOURCE NAT (SYNs a NAT one hop away dropped: no free source port)\n");
    let cells = rows
        .iter()
        .take(max)
        .map(|r| {
            let e = &r.entry;
            let ports = match (e.in_use, &e.range) {
                (Some(u), Some(range)) => {
                    format!("{u}/{}", u64::from(range.hi.saturating_sub(range.lo)) + 1)
                }
                (Some(u), None) => format!("{u}/?"),
                _ => "-".into(),
            };
            vec![
                right(e.router_netns),
                Cell::new(e.dst.to_string()),
                Cell::new(e.nat_addr.to_string()),
                right(e.drops),
                right(
                    r.drops_per_s
                        .map_or_else(|| "-".to_string(), |x| format!("{x:.1}")),
                ),
                right(ports),
                right(if e.utilisation.is_some() {
                    pct(e.utilisation)
                } else {
                    "-".into()
                }),
                Cell::new(first_of(&e.failers)),
                Cell::new(first_of(&e.holders)),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NAT NETNS",
            "DESTINATION",
            "NAT ADDR",
            "DROPS",
            "DROPS/S",
            "NAT PORTS",
            "UTIL",
            "FAILING",
            "HOLDING",
        ],
        cells,
        "",
    ));
    out.push('\n');
    if rows.len() > max {
        out.push_str(&format!("  (+{} more)\n", rows.len() - max));
    }
    out
}
