//! The report as text for a terminal. Pure.
use comfy_table::Cell;

use super::{
    doctor::findings as render_findings,
    text::{destinations as dest_table, offenders, plural, right, table},
};
use crate::{
    engine::{
        report::{CountSource, Report},
        timeline::Timeline,
    },
    schema::Ts,
};

const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Sparkline width at most.
pub const SPARK_WIDTH: usize = 72;

/// Merge neighbouring buckets so that at most `width` remain: (counts, seconds per column).
pub fn rebucket(t: &Timeline, width: usize) -> (Vec<u64>, u64) {
    let width = width.max(1);
    let k = t.counts.len().div_ceil(width).max(1);
    let cols = t.counts.chunks(k).map(|c| c.iter().sum()).collect();
    (cols, t.bucket_s * k as u64)
}

/// One character per column: blank for none, then eight heights relative to the maximum (any
/// non-zero column shows at least the lowest bar, so a single failure is never invisible).
pub fn sparkline(cols: &[u64]) -> String {
    let max = cols.iter().copied().max().unwrap_or(0);
    cols.iter()
        .map(|&c| {
            if c == 0 || max == 0 {
                ' '
            } else {
                let i = ((c as f64 / max as f64) * 7.0).round() as usize;
                SPARK[i.min(7)]
            }
        })
        .collect()
}

fn dur(a: Option<Ts>, b: Option<Ts>) -> Option<f64> {
    Some((b?.unix_ns() - a?.unix_ns()) as f64 / 1e9)
}

fn or_dash(t: Option<Ts>) -> String {
    t.map_or_else(|| "-".to_string(), |t| t.to_string())
}

/// What the tracers' bounded maps could not keep, as `trace` warns it at the end of a run.
pub fn bookkeeping(r: &Report) -> String {
    let mut out = String::new();
    if r.uncounted_keys > 0 {
        out.push_str(&format!(
            "{} missing from the per-process table (the kernel's counts map was full): the \
             total counts them, the offenders do not\n",
            plural(r.uncounted_keys, "failure is", "failures are")
        ));
    }
    if r.lru_evictions > 0 {
        out.push_str(&format!(
            "{} forgotten (ownership maps full): holders are incomplete; trace with a larger \
             --max-tracked-sockets\n",
            plural(r.lru_evictions, "socket owner was", "socket owners were")
        ));
    }
    out
}

/// How a process is named in the report's tables: its pid, or host/pid when the sessions
/// come from more than one host.
fn pid_label(r: &Report) -> impl Fn(&str, u32) -> String {
    let multi_host = r
        .sessions
        .iter()
        .map(|s| &s.host)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    move |host, pid| {
        if multi_host {
            format!("{host}/{pid}")
        } else {
            pid.to_string()
        }
    }
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let hosts: std::collections::BTreeSet<&str> =
        r.sessions.iter().map(|s| s.host.as_str()).collect();
    out.push_str(&format!(
        "portexhaust report: {}, {}, host{} {}\n",
        plural(r.files.len() as u64, "file", "files"),
        plural(r.sessions.len() as u64, "session", "sessions"),
        if hosts.len() == 1 { "" } else { "s" },
        hosts.into_iter().collect::<Vec<_>>().join(", ")
    ));
    if r.filter.since.is_some() || r.filter.until.is_some() || !r.filter.pids.is_empty() {
        out.push_str(&format!(
            "filter: since {} until {}{}\n",
            or_dash(r.filter.since),
            or_dash(r.filter.until),
            if r.filter.pids.is_empty() {
                String::new()
            } else {
                format!(
                    ", pid {}",
                    r.filter
                        .pids
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ));
    }
    out.push('\n');

    // The story in three lines.
    let how = if r.complete {
        "exact in-kernel counts".to_string()
    } else {
        let killed = r.sessions.iter().filter(|s| !s.complete).count() as u64;
        format!(
            "{} stopped without a summary: counts cover what was flushed",
            plural(killed, "tracer", "tracers")
        )
    };
    out.push_str(&format!(
        "{} ({how})\n",
        plural(
            r.failures_total,
            "exhaustion failure",
            "exhaustion failures"
        )
    ));
    if let (Some(a), Some(b)) = (&r.first_failure_ts, &r.last_failure_ts) {
        out.push_str(&format!(
            "first at {a}, last at {b} ({:.1} s)",
            dur(r.first_failure_ts, r.last_failure_ts).unwrap_or(0.0)
        ));
        if let (Some(p), Some(t)) = (r.peak_per_s, &r.peak_ts) {
            out.push_str(&format!("; peak {p:.0}/s at {t}"));
        }
        out.push('\n');
    }
    if r.dropped_events > 0 {
        out.push_str(&format!(
            "{} not recorded (ring buffer full) but counted; the timeline shows the {} recorded\n",
            plural(r.dropped_events, "event was", "events were"),
            r.recorded_events
        ));
    }
    out.push_str(&bookkeeping(r));
    if let Some(o) = r.offenders.first() {
        let d = o.item.destinations.first();
        out.push_str(&format!(
            "worst offender: {} (pid {}) with {}{}\n",
            o.item.comm,
            o.item.pid,
            plural(o.item.failures, "failure", "failures"),
            d.map(|d| format!(", mostly {} to {}", d.errno.name(), d.dst))
                .unwrap_or_default()
        ));
    }

    // Timeline.
    if !r.timeline.counts.is_empty() {
        let (cols, secs) = rebucket(&r.timeline, SPARK_WIDTH);
        let max = cols.iter().copied().max().unwrap_or(0);
        let start = r.timeline.start_ts.unwrap_or_default();
        let end = Ts(start.unix_ns() + (cols.len() as i128 * secs as i128) * 1_000_000_000);
        out.push_str(&format!(
            "\nTimeline: recorded failures, {} per column, {} to {} UTC, tallest column {}\n",
            plural(secs, "second", "seconds"),
            start.hms(),
            end.hms(),
            max
        ));
        out.push_str(&format!("  |{}|\n", sparkline(&cols)));
    }

    out.push_str("\nOffenders (who failed):\n");
    if r.offenders.is_empty() {
        out.push_str("  none\n");
    } else {
        let label = pid_label(r);
        out.push_str(&offenders(
            r.offenders
                .iter()
                .map(|o| (label(&o.host, o.item.pid), &o.item)),
            "  ",
        ));
        out.push('\n');
    }

    out.push_str("\nHolders (who held the ports):\n");
    if r.holders.is_empty() {
        out.push_str(
            "  not in these records (socket ownership is recorded by tracers with blame data)\n",
        );
    } else {
        let rows = r
            .holders
            .iter()
            .map(|h| {
                vec![
                    right(
                        h.holder
                            .pid
                            .map_or_else(|| "-".to_string(), |p| p.to_string()),
                    ),
                    Cell::new(h.holder.label()),
                    Cell::new(match (h.holder.pid, h.holder.alive) {
                        (None, _) => "before tracing",
                        (Some(_), true) => "yes",
                        (Some(_), false) => "exited",
                    }),
                    Cell::new(h.dst.to_string()),
                    right(h.holder.sockets),
                    right(h.holder.time_wait),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "PID",
                "COMM",
                "ALIVE",
                "DESTINATION",
                "SOCKETS",
                "TIME_WAIT",
            ],
            rows,
            "  ",
        ));
        out.push('\n');
    }

    out.push_str("\nCall sites (the code that made the connects):\n");
    if r.call_sites.is_empty() {
        out.push_str("  not in these records (recorded by tracers with call sites on)\n");
    } else {
        let label = pid_label(r);
        out.push_str(&super::text::call_sites(
            r.call_sites
                .iter()
                .map(|c| (label(&c.host, c.item.pid), &c.item)),
            20,
            "  ",
        ));
        out.push('\n');
    }

    if !r.nat.is_empty() {
        out.push_str(
            "\nSource NAT drops (SYNs a NAT one hop away dropped: no free source port):\n",
        );
        let many_hosts = r.nat.iter().any(|n| n.host != r.nat[0].host);
        for n in &r.nat {
            if many_hosts {
                out.push_str(&format!("{}: ", n.host));
            }
            out.push_str(&super::nat::entries(std::slice::from_ref(&n.item), true));
        }
    }

    out.push_str("\nDestinations (busiest seen):\n");
    if r.destinations.is_empty() {
        out.push_str("  none recorded\n");
    } else {
        let rows: Vec<_> = r.destinations.iter().map(|d| d.row.clone()).collect();
        out.push_str(&dest_table(&rows, "  "));
        out.push('\n');
        let w = super::text::what_if(&rows, 3, "  ");
        if !w.is_empty() {
            out.push_str(
                "\nWhat each fix would buy (steady state: rate x (lifetime + TIME_WAIT)):\n",
            );
            out.push_str(&w);
        }
    }

    out.push_str("\nSettings:\n");
    if r.settings.is_empty() {
        out.push_str("  none recorded\n");
    }
    for s in &r.settings {
        let v = &s.sysctls;
        let opt = |x: Option<i64>| x.map(|x| x.to_string()).unwrap_or_else(|| "?".into());
        out.push_str(&format!(
            "  {} netns {}: range {}, tcp_tw_reuse={}, tcp_fin_timeout={}, tcp_max_tw_buckets={}, \
             tcp_timestamps={}, reserved {:?}{}\n",
            s.host,
            s.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            s.range
                .map(|r| format!("{}-{} ({} usable)", r.lo, r.hi, r.usable))
                .unwrap_or_else(|| "?".into()),
            opt(v.tcp_tw_reuse),
            opt(v.tcp_fin_timeout),
            opt(v.tcp_max_tw_buckets),
            opt(v.tcp_timestamps),
            v.ip_local_reserved_ports.as_deref().unwrap_or("?"),
            v.tcp_tw_recycle
                .map(|x| format!(", tcp_tw_recycle={x}"))
                .unwrap_or_default()
        ));
    }

    out.push_str("\nFindings and what to do:\n");
    let mut scopes: Vec<(String, Option<u64>)> = Vec::new();
    for f in &r.findings {
        let k = (f.host.clone(), f.netns);
        if !scopes.contains(&k) {
            scopes.push(k);
        }
    }
    if scopes.is_empty() {
        out.push_str("  none\n");
    }
    for (host, ns) in scopes {
        out.push_str(&format!(
            "\n[{host}, netns {}]\n",
            ns.map(|n| n.to_string())
                .unwrap_or_else(|| "unknown".into())
        ));
        let fs: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.host == host && f.netns == ns)
            .map(|f| f.finding.clone())
            .collect();
        out.push_str(&render_findings(&fs));
    }

    out.push_str("\nSessions:\n");
    for s in &r.sessions {
        out.push_str(&format!(
            "  {}{}{}: {} {} {} .. {}: {} ({}){}\n",
            s.file,
            s.header_line.map(|l| format!(":{l}")).unwrap_or_default(),
            // A rotated record's later parts.
            s.more_files
                .iter()
                .map(|f| format!(" + {f}"))
                .collect::<String>(),
            s.host,
            s.backend.as_deref().unwrap_or("?"),
            s.start_ts
                .map_or_else(|| "?".to_string(), |t| t.to_string()),
            s.end_ts.map_or_else(|| "?".to_string(), |t| t.to_string()),
            plural(s.failures, "failure", "failures"),
            match s.counts_from {
                CountSource::Summary => "summary",
                CountSource::SnapshotAndEvents => "last snapshot + later events",
                CountSource::Events => "recorded events",
            },
            s.note
                .as_deref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        ));
    }
    if !r.problems.is_empty() {
        out.push_str(&format!(
            "\n{} reading the records (also on stderr):\n",
            plural(r.problems.len() as u64, "problem", "problems")
        ));
        for p in &r.problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_and_keeps_small_values_visible() {
        assert_eq!(sparkline(&[0, 1, 8, 4]), " ▂█▅");
        assert_eq!(sparkline(&[0, 1, 1000]), " ▁█");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[0, 0]), "  ");
    }

    #[test]
    fn rebucket_merges_columns() {
        let t = Timeline {
            start_ts: Some(Ts(0)),
            bucket_s: 2,
            counts: (1..=10).collect(),
        };
        let (cols, secs) = rebucket(&t, 4);
        assert_eq!(cols, vec![6, 15, 24, 10]);
        assert_eq!(secs, 6);
        assert_eq!(cols.iter().sum::<u64>(), 55);
    }
}
