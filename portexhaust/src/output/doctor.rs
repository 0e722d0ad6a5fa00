//! `doctor`'s text: findings with their fixes, and the busiest destinations. The findings part
//! is shared with `report`.
use portexhaust_common::TcpState;

use super::text::{destinations, wrap, wrap_at};
use crate::advice::{Audit, Finding, FixKind, Severity};

/// Findings as text: problems with their fixes, then one line per check that is fine.
pub fn findings(findings: &[Finding]) -> String {
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

pub fn render(a: &Audit) -> String {
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
            a.states.get(&TcpState::TimeWait).copied().unwrap_or(0)
        ));
    }
    if let Some(s) = a.watched_s {
        out.push_str(&format!("connects watched for {s:.0}s\n"));
    }
    out.push('\n');
    out.push_str(&findings(&a.findings));
    if !a.call_sites.is_empty() {
        out.push_str("\nCall sites seen (the code that made the connects):\n");
        out.push_str(&super::text::call_sites(
            a.call_sites.iter().map(|c| (c.pid.to_string(), c)),
            10,
            "",
        ));
        out.push('\n');
    }
    if !a.nat.is_empty() || a.conntrack.is_some_and(|c| c.insert_failed > 0) {
        out.push_str(&format!(
            "\nSource NAT of this namespace ({}):\n",
            match (a.watched_s, a.conntrack) {
                (Some(s), _) => format!("drops counted over {s:.0}s"),
                (None, Some(c)) => format!(
                    "conntrack since boot: {} insert_failed, {} drop",
                    c.insert_failed, c.drop
                ),
                (None, None) => "conntrack now".into(),
            }
        ));
        out.push_str(&super::nat::entries(&a.nat, a.watched_s.is_some()));
    }
    if !a.destinations.is_empty() {
        out.push_str("\nBusiest destinations (ports of the range in use):\n");
        out.push_str(&destinations(&a.destinations, ""));
        out.push('\n');
        let w = super::text::what_if(&a.destinations, 3, "");
        if !w.is_empty() {
            out.push_str(
                "\nWhat each fix would buy (steady state: rate x (lifetime + TIME_WAIT)):\n",
            );
            out.push_str(&w);
        }
    }
    out
}
