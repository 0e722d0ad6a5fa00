//! Source-NAT port exhaustion one hop away (issue 15): what to do, application first.
use super::{Evidence, Finding, Severity, app, capacity, finding, sysctl};

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
        ],
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
}
