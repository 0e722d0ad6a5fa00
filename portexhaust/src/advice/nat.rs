//! Source-NAT port exhaustion one hop away (issue 15): what to do, application first.
use super::{Evidence, Finding, Fix, Severity, app, capacity, finding, pct, sysctl};
use crate::schema::NatEntry;

/// The fixes of a NAT out of ports, in the order that helps most with least risk.
fn nat_fixes() -> Vec<Fix> {
    vec![
        app(
            "Reuse connections in the client (a pool, HTTP keep-alive): each new connection \
             through the NAT holds one of its ports for the connection's life and, after \
             a close, for the conntrack TIME_WAIT timeout (120 s)",
        ),
        capacity(
            "Give the NAT more source addresses (snat to a pool of addresses, or one egress \
             address per node pool): each address has its own ports per destination",
        ),
        capacity(
            "Randomise the NAT's port choice: --random-fully on an iptables MASQUERADE/SNAT \
             rule, `masquerade fully-random` in nftables (kube-proxy, flannel and Calico \
             have an option for it): clashes between parallel connects drop less",
        ),
        capacity(
            "Widen the NAT's port range (`masquerade to :LO-HI` / --to-ports), if it was \
             narrowed",
        ),
        sysctl(
            "Keep nf_conntrack_max and tcp_tw_reuse in context: a full conntrack table drops \
             differently (early_drop, 'table full'), and tcp_tw_reuse on the client frees no \
             NAT port",
            "sysctl net.netfilter.nf_conntrack_count net.netfilter.nf_conntrack_max",
        ),
    ]
}

/// NAT utilisation worth a finding: half the range, and nearly all of it.
const NAT_WARN: f64 = 0.5;
const NAT_CRIT: f64 = 0.9;
/// Destinations named in one finding.
const NAT_NAMED: usize = 5;

/// The NAT's ports towards a destination are (nearly) all taken: the next connections through
/// it will be dropped, whether or not anything was watched dropping yet.
pub(super) fn nat_range_rule(nat: &[NatEntry], out: &mut Vec<Finding>) {
    let mut full: Vec<&NatEntry> = nat
        .iter()
        .filter(|e| e.utilisation.is_some_and(|u| u >= NAT_WARN))
        .collect();
    if full.is_empty() {
        return;
    }
    full.sort_by(|a, b| {
        b.utilisation
            .partial_cmp(&a.utilisation)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.drops.cmp(&a.drops))
    });
    let worst = full[0].utilisation.unwrap_or(0.0);
    let named: Vec<String> = full
        .iter()
        .take(NAT_NAMED)
        .map(|e| {
            let holder = e
                .holders
                .first()
                .and_then(|h| h.pid.map(|p| format!(", most held by {} ({p})", h.comm)))
                .unwrap_or_default();
            format!(
                "{} via {}: {}/{} ports ({}){holder}",
                e.dst,
                e.nat_addr,
                e.in_use.unwrap_or(0),
                e.range
                    .as_ref()
                    .map_or(0, |r| u64::from(r.hi.saturating_sub(r.lo)) + 1),
                pct(e.utilisation.unwrap_or(0.0))
            )
        })
        .collect();
    out.push(finding(
        "nat_range",
        if worst >= NAT_CRIT {
            Severity::Critical
        } else {
            Severity::Warning
        },
        if full.iter().all(|e| e.utilisation.is_some_and(|u| u >= 1.0)) {
            format!(
                "the source NAT has no free port left towards {} destination(s): {}",
                full.len(),
                named.join("; ")
            )
        } else {
            format!(
                "the source NAT's ports towards {} destination(s) are {} used or more: {}",
                full.len(),
                pct(NAT_WARN),
                named.join("; ")
            )
        },
        "Each connection through the NAT holds one of its ports per destination for as long          as conntrack tracks it (established, then 120 s of TIME_WAIT). When all are taken,          new connections' SYNs are dropped (insert_failed): the clients see timeouts, not          errno 99."
            .into(),
        nat_fixes(),
    ));
}

/// conntrack counted insert failures since boot, and nothing was watched to say whether it is
/// happening now: say so, and how to find out.
pub(super) fn insert_failed_rule(
    counters: Option<(u64, u64)>,
    nat: &[NatEntry],
    evidence: Option<&Evidence>,
    out: &mut Vec<Finding>,
) {
    let Some((failed, _)) = counters.filter(|(f, _)| *f > 0) else {
        return;
    };
    if evidence.is_some_and(|e| e.snat_drops > 0) {
        return; // the watched drops say it better
    }
    let nat_here = nat.iter().any(|e| e.range.is_some());
    out.push(finding(
        "conntrack_insert_failed",
        if nat_here {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!("conntrack failed to insert {failed} new connection(s) since boot"),
        format!(
            "Each insert failure is a dropped packet, usually a SYN{}. The counter does not say              when or who: `sudo portexhaust doctor --watch 30` (or `trace --catch nat`) counts              the drops as they happen and names the client behind each.",
            if nat_here {
                ", most often a source NAT with no free port for the destination"
            } else {
                ""
            }
        ),
        if nat_here { nat_fixes() } else { Vec::new() },
    ));
}

/// The NAT dropped SYNs for want of a source port towards a destination. The fixes in the
/// order that helps most with least risk: fewer new connections; more source addresses for
/// the NAT; a port choice that does not collide (`--random-fully`); a wider range; and only
/// then the conntrack table and `tcp_tw_reuse`, which do not give the NAT more ports.
pub(super) fn snat_rule(e: Option<&Evidence>, out: &mut Vec<Finding>) {
    let Some(e) = e.filter(|e| e.snat_drops > 0) else {
        return;
    };
    out.push(finding(
        "snat_port_exhaustion",
        Severity::Critical,
        format!(
            "a source NAT dropped {} SYNs: no free source port towards the destination",
            e.snat_drops
        ),
        "The NAT (masquerade/SNAT on the node or a router) maps every connection to one of its \
         own ports per destination; when all are taken by tracked connections the new \
         connection's conntrack entry cannot be inserted (insert_failed) and its SYN is \
         dropped. connect() does not fail: the client sees a slow connect or a timeout."
            .into(),
        nat_fixes(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_come_in_order() {
        let mut out = Vec::new();
        snat_rule(Some(&Evidence::default()), &mut out);
        assert!(out.is_empty());
        let e = Evidence {
            snat_drops: 6,
            ..Default::default()
        };
        snat_rule(Some(&e), &mut out);
        let f = &out[0];
        assert_eq!(f.id, "snat_port_exhaustion");
        assert!(f.title.contains("6 SYNs"));
        let texts: Vec<&str> = f.fixes.iter().map(|x| x.text.as_str()).collect();
        assert!(texts[0].starts_with("Reuse connections"));
        assert!(texts[1].contains("more source addresses"));
        assert!(texts[2].contains("--random-fully"));
        assert!(texts[3].starts_with("Widen"));
        assert!(texts[4].contains("nf_conntrack_max"));
    }

    fn entry(dst: &str, in_use: u64, lo: u16, hi: u16) -> NatEntry {
        NatEntry {
            router_netns: 1,
            proto: crate::schema::Proto::Tcp,
            dst: dst.parse().expect("addr"),
            nat_addr: "192.0.2.1".parse().expect("ip"),
            drops: 0,
            failers: vec![],
            conntrack_entries: Some(in_use),
            in_use: Some(in_use),
            range: Some(crate::schema::NatRange {
                lo,
                hi,
                source: "nft".into(),
            }),
            utilisation: crate::schema::utilisation(in_use, Some(u64::from(hi - lo) + 1)),
            holders: vec![crate::schema::NatClient {
                pid: Some(4242),
                comm: "python3".into(),
                netns: Some(2),
                count: in_use,
                container: None,
            }],
            insert_failed_delta: None,
        }
    }

    #[test]
    fn a_full_nat_range_is_critical_and_names_its_holder() {
        let mut out = Vec::new();
        nat_range_rule(&[entry("10.0.0.9:443", 3, 40000, 40009)], &mut out);
        assert!(out.is_empty(), "30% is no finding");
        nat_range_rule(
            &[
                entry("10.0.0.8:80", 6, 40000, 40009),
                entry("10.0.0.9:443", 10, 40000, 40009),
            ],
            &mut out,
        );
        let f = &out[0];
        assert_eq!(f.id, "nat_range");
        assert_eq!(f.severity, Severity::Critical);
        assert!(
            f.title.contains("2 destination(s)")
                && f.title.find("10.0.0.9:443") < f.title.find("10.0.0.8:80"),
            "fullest first: {}",
            f.title
        );
        assert!(
            f.title
                .contains("10/10 ports (100%), most held by python3 (4242)")
        );
        assert!(f.fixes[0].text.starts_with("Reuse connections"));
        let mut full = Vec::new();
        nat_range_rule(&[entry("10.0.0.9:443", 10, 40000, 40009)], &mut full);
        assert!(
            full[0]
                .title
                .starts_with("the source NAT has no free port left towards 1")
        );
        let mut out = Vec::new();
        nat_range_rule(&[entry("10.0.0.8:80", 6, 40000, 40009)], &mut out);
        assert_eq!(out[0].severity, Severity::Warning);
    }

    #[test]
    fn insert_failures_since_boot_point_to_watching() {
        let nat = [entry("10.0.0.9:443", 3, 40000, 40009)];
        let mut out = Vec::new();
        insert_failed_rule(Some((0, 0)), &nat, None, &mut out);
        insert_failed_rule(None, &nat, None, &mut out);
        assert!(out.is_empty());
        insert_failed_rule(Some((7, 7)), &nat, None, &mut out);
        assert_eq!(out[0].severity, Severity::Warning);
        assert!(out[0].title.contains("7 new connection(s)"));
        assert!(out[0].detail.contains("doctor --watch"));
        assert_eq!(out[0].fixes.len(), 5);
        // No NAT here: a note, no NAT fixes.
        let mut out = Vec::new();
        insert_failed_rule(Some((7, 7)), &[], None, &mut out);
        assert_eq!(out[0].severity, Severity::Info);
        assert!(out[0].fixes.is_empty());
        // Watched drops say it better.
        let mut out = Vec::new();
        let e = Evidence {
            snat_drops: 2,
            ..Default::default()
        };
        insert_failed_rule(Some((7, 7)), &nat, Some(&e), &mut out);
        assert!(out.is_empty());
    }
}
