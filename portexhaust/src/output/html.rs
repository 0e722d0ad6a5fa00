//! The report as one self-contained HTML page: inline CSS and an inline SVG chart, no script,
//! no fonts, no request of any kind (it must open on an air-gapped incident laptop). Every
//! recorded string is escaped: process names are chosen by whoever runs the process. Pure.
use std::fmt::Write as _;

use crate::{
    advice::{FixKind, Severity},
    engine::report::{CountSource, Report},
    schema::Ts,
};

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;
padding:0 1rem;color:#1d232b;background:#fff;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde2e8;padding-bottom:.2rem}
.sub{color:#5b6570;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{border:1px solid #dde2e8;border-radius:6px;padding:.6rem .9rem;min-width:9rem}
.card b{display:block;font-size:1.35rem}.card span{color:#5b6570;font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eef1f4;vertical-align:top}
th{background:#f5f7f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{fill:#c0392b}.axis{stroke:#8a96a3;stroke-width:1}.grid{stroke:#eef1f4;stroke-width:1}
svg text{font-size:11px;fill:#5b6570}
.sev{display:inline-block;font-size:.75rem;font-weight:600;padding:.05rem .4rem;border-radius:3px;color:#fff}
.critical{background:#b03a2e}.warning{background:#c87f0a}.info{background:#2e6da4}.ok{background:#2e8b57}
.finding{border:1px solid #dde2e8;border-radius:6px;padding:.6rem .9rem;margin:.6rem 0}
.finding p{margin:.3rem 0}.fixes{margin:.3rem 0 0 1.2rem;padding:0}
code{background:#f5f7f9;padding:.05rem .3rem;border-radius:3px}
.util{background:#eef1f4;width:8rem;height:.7rem;display:inline-block;vertical-align:middle}
.util i{display:block;height:100%;background:#c0392b}
.muted{color:#5b6570}
";

fn sev_badge(s: Severity) -> String {
    format!("<span class=\"sev {0}\">{0}</span>", s.name())
}

/// The timeline as an inline SVG bar chart (id `timeline-chart`, one `rect.bar` per bucket
/// with failures).
pub fn chart(r: &Report) -> String {
    let t = &r.timeline;
    let (w, h) = (960.0f64, 260.0f64);
    let (left, right, top, bottom) = (56.0, 12.0, 14.0, 36.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = t.counts.iter().copied().max().unwrap_or(0).max(1);
    let per_s = |c: u64| c as f64 / t.bucket_s as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"timeline-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" \
         width=\"100%\" role=\"img\" aria-labelledby=\"timeline-title\">\
         <title id=\"timeline-title\">Recorded exhaustion failures per second</title>"
    );
    // Horizontal grid with the y labels (failures per second).
    for i in 0..=4 {
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let v = per_s(max) * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            if v >= 10.0 || v == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
    }
    let n = t.counts.len().max(1) as f64;
    let bw = plot_w / n;
    for (i, &c) in t.counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let bh = (plot_h * c as f64 / max as f64).max(1.0);
        let x = left + bw * i as f64;
        let y = top + plot_h - bh;
        let when = t.bucket_ts(i).map(Ts::hms).unwrap_or_default();
        let _ = write!(
            s,
            "<rect class=\"bar\" x=\"{x:.2}\" y=\"{y:.2}\" width=\"{:.2}\" height=\"{bh:.2}\">\
             <title>{when}: {c} failures</title></rect>",
            (bw * 0.9).max(0.5)
        );
    }
    let _ = write!(
        s,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\"/>\
         <line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0:.1}\"/>",
        top + plot_h,
        left + plot_w
    );
    // Time labels: start, middle, end.
    if let Some(start) = t.start_ts {
        let span = t.counts.len() as i128 * t.bucket_s as i128 * 1_000_000_000;
        for (frac, anchor) in [(0.0, "start"), (0.5, "middle"), (1.0, "end")] {
            let x = left + plot_w * frac;
            let at = Ts(start.unix_ns() + (span as f64 * frac) as i128);
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
                top + plot_h + 16.0,
                at.hms()
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">UTC, {} s per bar</text>",
            left + plot_w / 2.0,
            h - 4.0,
            t.bucket_s
        );
    }
    s.push_str("</svg>");
    s
}

fn card(out: &mut String, value: &str, label: &str) {
    let _ = write!(
        out,
        "<div class=\"card\"><b>{}</b><span>{}</span></div>",
        esc(value),
        esc(label)
    );
}

fn ts_short(ts: &Option<Ts>) -> String {
    ts.map(Ts::hms).unwrap_or_else(|| "-".into())
}

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let hosts: std::collections::BTreeSet<&str> =
        r.sessions.iter().map(|s| s.host.as_str()).collect();
    let hosts = hosts.into_iter().collect::<Vec<_>>().join(", ");
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\">\
         <title>portexhaust report: {}</title><style>{CSS}</style></head><body>\
         <h1>Port exhaustion report</h1><p class=\"sub\">{} &middot; {} file(s), {} session(s)</p>",
        esc(&hosts),
        esc(&hosts),
        r.files.len(),
        r.sessions.len()
    );

    o.push_str("<div class=\"cards\">");
    card(&mut o, &r.failures_total.to_string(), "exhaustion failures");
    card(
        &mut o,
        if r.complete { "exact" } else { "as flushed" },
        if r.complete {
            "in-kernel counts"
        } else {
            "a tracer was stopped without a summary"
        },
    );
    card(
        &mut o,
        &ts_short(&r.first_failure_ts),
        "first failure (UTC)",
    );
    card(&mut o, &ts_short(&r.last_failure_ts), "last failure (UTC)");
    if let Some(p) = r.peak_per_s {
        card(
            &mut o,
            &format!("{p:.0}/s"),
            &format!("peak at {}", ts_short(&r.peak_ts)),
        );
    }
    card(&mut o, &r.offenders.len().to_string(), "processes failing");
    if r.dropped_events > 0 {
        card(
            &mut o,
            &r.dropped_events.to_string(),
            "events dropped (counted, not charted)",
        );
    }
    o.push_str("</div>");

    o.push_str("<h2 id=\"timeline\">Failures over time</h2>");
    if r.timeline.counts.is_empty() {
        o.push_str("<p class=\"muted\">No failure was recorded as an event.</p>");
    }
    o.push_str(&chart(r));

    o.push_str("<h2 id=\"offenders\">Offenders: who failed</h2>");
    for line in super::report_text::bookkeeping(r).lines() {
        let _ = write!(o, "<p class=\"warn\">{}</p>", esc(line));
    }
    if r.offenders.is_empty() {
        o.push_str("<p class=\"muted\">None.</p>");
    } else {
        o.push_str("<table><tr><th>Host</th><th>PID</th><th>Command</th><th>Failures</th><th>First</th><th>Last</th><th>Destinations</th></tr>");
        for f in &r.offenders {
            let (host, f) = (&f.host, &f.item);
            let dests = f
                .destinations
                .iter()
                .take(5)
                .map(|d| {
                    format!(
                        "{} <span class=\"muted\">{}</span> &times;{}",
                        esc(&d.dst.to_string()),
                        d.errno.name(),
                        d.failures
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>");
            let _ = write!(
                o,
                "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(host),
                f.pid,
                esc(&f.comm),
                f.failures,
                ts_short(&f.first_ts),
                ts_short(&f.last_ts),
                dests
            );
        }
        o.push_str("</table>");
    }

    o.push_str("<h2 id=\"holders\">Holders: who held the ports</h2>");
    if r.holders.is_empty() {
        o.push_str("<p class=\"muted\">Not in these records (socket ownership is recorded by tracers with blame data).</p>");
    } else {
        o.push_str("<table><tr><th>PID</th><th>Command</th><th>Alive</th><th>Destination</th><th>Sockets</th><th>TIME_WAIT</th></tr>");
        for h in &r.holders {
            let _ = write!(
                o,
                "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                h.holder
                    .pid
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                esc(&h.holder.label()),
                match (h.holder.pid, h.holder.alive) {
                    (None, _) => "before tracing",
                    (Some(_), true) => "yes",
                    (Some(_), false) => "exited",
                },
                esc(&h.dst.to_string()),
                h.holder.sockets,
                h.holder.time_wait
            );
        }
        o.push_str("</table>");
    }

    o.push_str("<h2 id=\"call-sites\">Call sites: the code that made the connects</h2>");
    if r.call_sites.is_empty() {
        o.push_str(
            "<p class=\"muted\">Not in these records (recorded by tracers with call sites on).</p>",
        );
    } else {
        o.push_str("<table><tr><th>Host</th><th>PID</th><th>Command</th><th>Destination</th><th>Call site (top frames)</th><th>Connects</th><th>Failures</th><th>Holds ESTAB/TW</th></tr>");
        for c in r.call_sites.iter().take(50) {
            let (host, s) = (&c.host, &c.item);
            let frames = s
                .frames
                .iter()
                .take(8)
                .map(|f| esc(&f.label()))
                .collect::<Vec<_>>()
                .join("<br>");
            let bound = if s.bound_connects > 0 {
                format!(" <span class=\"muted\">({} bound)</span>", s.bound_connects)
            } else {
                String::new()
            };
            let _ = write!(
                o,
                "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td>\
                 <td><details><summary>{}</summary><small>{}</small></details></td>\
                 <td class=\"n\">{}{bound}</td><td class=\"n\">{}</td><td class=\"n\">{}/{}{}</td></tr>",
                esc(host),
                s.pid,
                esc(&s.comm),
                esc(&s.dst.to_string()),
                esc(&s.label()),
                frames,
                s.connects,
                s.failures,
                s.holds_established,
                s.holds_time_wait,
                if s.holds_estimated { "~" } else { "" }
            );
        }
        o.push_str("</table>");
    }

    if !r.nat.is_empty() {
        o.push_str("<h2 id=\"nat\">Source NAT: SYNs dropped one hop away</h2>");
        o.push_str("<table><tr><th>Host</th><th>NAT netns</th><th>Destination</th><th>NAT address</th><th>Drops</th><th>NAT ports in use</th><th>Used</th><th>Failing</th><th>Holding</th></tr>");
        let who = |cs: &[crate::schema::NatClient]| {
            cs.iter()
                .take(3)
                .map(|c| match c.pid {
                    Some(p) => format!("{} ({p}) x{}", esc(&c.comm), c.count),
                    None => format!("(client not found) x{}", c.count),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        for n in &r.nat {
            let e = &n.item;
            let range = e.range.as_ref().map_or_else(
                || "?".to_string(),
                |r| (u64::from(r.hi.saturating_sub(r.lo)) + 1).to_string(),
            );
            let _ = write!(
                o,
                "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}/{range}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.host),
                e.router_netns,
                esc(&e.dst.to_string()),
                esc(&e.nat_addr.to_string()),
                e.drops,
                e.in_use.map_or_else(|| "?".to_string(), |u| u.to_string()),
                e.utilisation
                    .map_or_else(|| "?".to_string(), |u| format!("{:.0}%", u * 100.0)),
                who(&e.failers),
                who(&e.holders),
            );
        }
        o.push_str("</table>");
    }

    o.push_str("<h2 id=\"destinations\">Destinations: how full the range got</h2>");
    if r.destinations.is_empty() {
        o.push_str("<p class=\"muted\">None recorded.</p>");
    } else {
        o.push_str("<table><tr><th>Source</th><th>Destination</th><th>In use</th><th>Range</th><th>Used</th><th>States</th><th>Seen</th></tr>");
        for d in &r.destinations {
            let u = (d.row.utilisation.unwrap_or(0.0).clamp(0.0, 1.0) * 100.0).round();
            let states = d
                .row
                .by_state
                .iter()
                .map(|(k, v)| format!("{} {v}", k.name()))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td><span class=\"util\"><i style=\"width:{u}%\"></i></span> {u}%</td><td>{}</td><td>{}</td></tr>",
                esc(&d.row.src.map_or_else(|| "-".to_string(), |a| a.to_string())),
                esc(&d.row.dst.to_string()),
                d.row.in_use,
                d.row
                    .range_size
                    .map_or_else(|| "?".to_string(), |n| n.to_string()),
                states,
                ts_short(&d.ts)
            );
        }
        o.push_str("</table>");
    }

    o.push_str("<h2 id=\"settings\">Settings</h2>");
    if r.settings.is_empty() {
        o.push_str("<p class=\"muted\">None recorded.</p>");
    } else {
        o.push_str("<table><tr><th>Host</th><th>Netns</th><th>ip_local_port_range</th><th>reserved</th><th>tcp_tw_reuse</th><th>tcp_fin_timeout</th><th>tcp_max_tw_buckets</th><th>tcp_timestamps</th></tr>");
        let opt = |x: Option<i64>| x.map(|x| x.to_string()).unwrap_or_else(|| "?".into());
        for s in &r.settings {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.host),
                s.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                s.range
                    .map(|r| format!("{}&ndash;{} ({} usable)", r.lo, r.hi, r.usable))
                    .unwrap_or_else(|| "?".into()),
                esc(s.sysctls.ip_local_reserved_ports.as_deref().unwrap_or("?")),
                opt(s.sysctls.tcp_tw_reuse),
                opt(s.sysctls.tcp_fin_timeout),
                opt(s.sysctls.tcp_max_tw_buckets),
                opt(s.sysctls.tcp_timestamps)
            );
        }
        o.push_str("</table>");
    }

    o.push_str("<h2 id=\"findings\">Findings and what to do</h2>");
    if r.findings.is_empty() {
        o.push_str("<p class=\"muted\">None.</p>");
    }
    for f in r
        .findings
        .iter()
        .filter(|f| f.finding.severity > Severity::Ok)
    {
        let fi = &f.finding;
        let _ = write!(
            o,
            "<div class=\"finding\"><p>{} <b>{}</b> <span class=\"muted\">{} netns {}</span></p><p>{}</p>",
            sev_badge(fi.severity),
            esc(&fi.title),
            esc(&f.host),
            f.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            esc(&fi.detail)
        );
        if !fi.fixes.is_empty() {
            o.push_str("<ol class=\"fixes\">");
            for x in &fi.fixes {
                let kind = match x.kind {
                    FixKind::Application => "application",
                    FixKind::Capacity => "capacity",
                    FixKind::Sysctl => "sysctl",
                };
                let _ = write!(o, "<li><i>{kind}</i>: {}", esc(&x.text));
                if let Some(c) = &x.command {
                    let _ = write!(o, "<br><code>{}</code>", esc(c));
                }
                o.push_str("</li>");
            }
            o.push_str("</ol>");
        }
        o.push_str("</div>");
    }

    o.push_str("<h2 id=\"sessions\">Sessions</h2><table><tr><th>File</th><th>Host</th><th>Backend</th><th>Start</th><th>End</th><th>Failures</th><th>Counted from</th></tr>");
    for s in &r.sessions {
        let _ = write!(
            o,
            "<tr><td>{}{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}{}</td></tr>",
            esc(&s.file),
            s.header_line.map(|l| format!(":{l}")).unwrap_or_default(),
            // A rotated record's later parts.
            s.more_files
                .iter()
                .map(|f| format!(" + {}", esc(f)))
                .collect::<String>(),
            esc(&s.host),
            esc(s.backend.as_deref().unwrap_or("?")),
            s.start_ts
                .map_or_else(|| "?".to_string(), |t| t.to_string()),
            s.end_ts.map_or_else(|| "?".to_string(), |t| t.to_string()),
            s.failures,
            match s.counts_from {
                CountSource::Summary => "summary",
                CountSource::SnapshotAndEvents => "last snapshot + later events",
                CountSource::Events => "recorded events",
            },
            s.note
                .as_deref()
                .map(|n| format!("<br><span class=\"muted\">{}</span>", esc(n)))
                .unwrap_or_default()
        );
    }
    o.push_str("</table>");
    if !r.problems.is_empty() {
        o.push_str("<h2 id=\"problems\">Problems reading the records</h2><ul>");
        for p in &r.problems {
            let _ = write!(o, "<li>{}</li>", esc(&p.to_string()));
        }
        o.push_str("</ul>");
    }
    o.push_str("<p class=\"muted\">Generated by portexhaust report.</p></body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_a_process_name_could_smuggle() {
        assert_eq!(
            esc("<script>alert('x')&\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;"
        );
    }
}
