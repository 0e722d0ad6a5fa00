//! The report as text for a terminal. Pure.
use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};

use super::model::{Report, Timeline};
use crate::{
    clock::hms,
    doctor::{dest_table, render_findings},
    report::parse::parse_ts,
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

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn dur(a: &Option<String>, b: &Option<String>) -> Option<f64> {
    let a = parse_ts(a.as_deref()?)?;
    let b = parse_ts(b.as_deref()?)?;
    Some((b - a) as f64 / 1e9)
}

fn table(header: &[&str], rows: Vec<Vec<Cell>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
        .lines()
        .map(|l| format!("  {}", l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
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
            r.filter.since.as_deref().unwrap_or("-"),
            r.filter.until.as_deref().unwrap_or("-"),
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
            dur(&r.first_failure_ts, &r.last_failure_ts).unwrap_or(0.0)
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
    if let Some(o) = r.offenders.first() {
        let d = o.destinations.first();
        out.push_str(&format!(
            "worst offender: {} (pid {}) with {}{}\n",
            o.comm,
            o.pid,
            plural(o.failures, "failure", "failures"),
            d.map(|d| format!(", mostly {} to {}", d.errname, d.dst))
                .unwrap_or_default()
        ));
    }

    // Timeline.
    if !r.timeline.counts.is_empty() {
        let (cols, secs) = rebucket(&r.timeline, SPARK_WIDTH);
        let max = cols.iter().copied().max().unwrap_or(0);
        let start = r.timeline.start_ns.unwrap_or(0);
        let end = start + (cols.len() as i128 * secs as i128) * 1_000_000_000;
        out.push_str(&format!(
            "\nTimeline: recorded failures, {} per column, {} to {} UTC, tallest column {}\n",
            plural(secs, "second", "seconds"),
            hms(start),
            hms(end),
            max
        ));
        out.push_str(&format!("  |{}|\n", sparkline(&cols)));
    }

    out.push_str("\nOffenders (who failed):\n");
    if r.offenders.is_empty() {
        out.push_str("  none\n");
    } else {
        let multi_host = r
            .sessions
            .iter()
            .map(|s| &s.host)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1;
        let rows = r
            .offenders
            .iter()
            .map(|o| {
                let mut dests: Vec<String> = o
                    .destinations
                    .iter()
                    .take(3)
                    .map(|d| format!("{} {} x{}", d.dst, d.errname, d.failures))
                    .collect();
                if o.destinations.len() > 3 {
                    dests.push(format!("(+{} more)", o.destinations.len() - 3));
                }
                vec![
                    Cell::new(if multi_host {
                        format!("{}/{}", o.host, o.pid)
                    } else {
                        o.pid.to_string()
                    })
                    .set_alignment(CellAlignment::Right),
                    Cell::new(&o.comm),
                    Cell::new(o.failures).set_alignment(CellAlignment::Right),
                    Cell::new(
                        o.first_ts
                            .as_deref()
                            .and_then(parse_ts)
                            .map(hms)
                            .unwrap_or_default(),
                    ),
                    Cell::new(
                        o.last_ts
                            .as_deref()
                            .and_then(parse_ts)
                            .map(hms)
                            .unwrap_or_default(),
                    ),
                    Cell::new(dests.join(", ")),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "PID",
                "COMM",
                "FAILURES",
                "FIRST",
                "LAST",
                "TOP DESTINATIONS",
            ],
            rows,
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
                    Cell::new(h.pid).set_alignment(CellAlignment::Right),
                    Cell::new(&h.comm),
                    Cell::new(match h.alive {
                        Some(true) => "yes",
                        Some(false) => "exited",
                        None => "?",
                    }),
                    Cell::new(&h.dst),
                    Cell::new(h.sockets).set_alignment(CellAlignment::Right),
                    Cell::new(h.time_wait).set_alignment(CellAlignment::Right),
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
        ));
        out.push('\n');
    }

    out.push_str("\nDestinations (busiest seen):\n");
    if r.destinations.is_empty() {
        out.push_str("  none recorded\n");
    } else {
        let rows: Vec<_> = r.destinations.iter().map(|d| d.row.clone()).collect();
        for l in dest_table(&rows).lines() {
            out.push_str(&format!("  {l}\n"));
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
            "  {}{}: {} {} {} .. {}: {} ({}){}\n",
            s.file,
            s.header_line.map(|l| format!(":{l}")).unwrap_or_default(),
            s.host,
            s.backend.as_deref().unwrap_or("?"),
            s.start_ts.as_deref().unwrap_or("?"),
            s.end_ts.as_deref().unwrap_or("?"),
            plural(s.failures, "failure", "failures"),
            match s.counts_from {
                super::model::CountSource::Summary => "summary",
                super::model::CountSource::SnapshotAndEvents => "last snapshot + later events",
                super::model::CountSource::Events => "recorded events",
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
            start_ts: None,
            start_ns: Some(0),
            bucket_s: 2,
            counts: (1..=10).collect(),
        };
        let (cols, secs) = rebucket(&t, 4);
        assert_eq!(cols, vec![6, 15, 24, 10]);
        assert_eq!(secs, 6);
        assert_eq!(cols.iter().sum::<u64>(), 55);
    }
}
