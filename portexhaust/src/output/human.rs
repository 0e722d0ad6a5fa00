//! The live human output: the failure lines, tallies, and the summary when tracing stops.
//! Pure. (The JSON of the same things is the schema's own lines.)

use super::text::{holders, or_unknown, pct};
use crate::schema::{BlameEntry, ContainerInfo, Failure, Tally, Totals};

/// Column layout of the live human output; the header and each row share it.
const HEADER: [&str; 13] = [
    "TIME",
    "PID",
    "TID",
    "UID",
    "COMM",
    "NETNS",
    "PROTO",
    "DESTINATION",
    "SOURCE",
    "ERRNO",
    "CAUSE",
    "SITE",
    "CONTAINER",
];

fn row(cols: [&str; 13]) -> String {
    format!(
        "{:<12} {:>7} {:>7} {:>6} {:<15} {:>10} {:<5} {:<21} {:<15} {:<13} {:<18} {:<19} {}",
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        cols[4],
        cols[5],
        cols[6],
        cols[7],
        cols[8],
        cols[9],
        cols[10],
        cols[11],
        cols[12]
    )
}

pub fn human_header() -> String {
    row(HEADER)
}

pub fn human_line(f: &Failure) -> String {
    let netns = f.netns.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    let src = f.src.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    let container = f
        .container
        .as_deref()
        .map(ContainerInfo::short)
        .unwrap_or_else(|| "-".into());
    row([
        &f.ts.hms(),
        &f.pid.to_string(),
        &f.tid.to_string(),
        &f.uid.to_string(),
        &f.comm,
        &netns,
        f.proto.name(),
        &f.dst.to_string(),
        &src,
        f.errno.name(),
        f.cause.name(),
        f.site.name(),
        &container,
    ])
}

pub fn human_tally(t: &Tally) -> String {
    format!(
        "{:<12} {:>7} {:>7} {:>6} {:<15} +{} more {} ({}) to {} not shown (over --events-per-s \
         or the ring buffer was full; all counted)",
        t.last_ts.hms(),
        t.pid,
        "-",
        "-",
        t.comm,
        t.count,
        t.errno.name(),
        t.cause.name(),
        t.dst
    )
}

/// "10/10 ports (100%): ESTABLISHED 4, TIME_WAIT 6"
fn usage_line(b: &BlameEntry) -> String {
    let states: Vec<String> = b
        .by_state
        .iter()
        .map(|(s, n)| format!("{} {n}", s.name()))
        .collect();
    format!(
        "{}/{} ports in use ({}){}{}",
        b.in_use,
        or_unknown(b.range_size),
        pct(b.utilisation()),
        if states.is_empty() { "" } else { ": " },
        states.join(", ")
    )
}

/// The blame section of the human summary.
pub fn human_blame(blame: &[BlameEntry]) -> String {
    let mut out = String::new();
    for b in blame {
        out.push_str(&format!(
            "\n{} (netns {}): {}\n",
            b.dst,
            b.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            usage_line(b)
        ));
        let failers: Vec<String> = b
            .failers
            .iter()
            .map(|f| match &f.container {
                Some(c) => format!("{} ({}) [{}] x{}", f.comm, f.pid, c.short(), f.failures),
                None => format!("{} ({}) x{}", f.comm, f.pid, f.failures),
            })
            .collect();
        out.push_str(&format!("  failing: {}\n", failers.join(", ")));
        if b.holders.is_empty() {
            out.push_str("  holders: none found (the namespace or its sockets are gone)\n");
            continue;
        }
        out.push_str(&holders(
            &b.holders,
            "HOLDER",
            "opened before tracing",
            "  ",
        ));
        out.push('\n');
    }
    out
}

/// The human summary printed when tracing stops.
pub fn human_summary(s: &Totals) -> String {
    let mut out = format!(
        "\n{} exhaustion failure{} in {:.1}s (backend {}, exact in-kernel counts)",
        s.failures_total,
        if s.failures_total == 1 { "" } else { "s" },
        s.duration_s.unwrap_or(0.0),
        s.backend.map_or("?", |b| b.name())
    );
    if s.dropped_events > 0 {
        out.push_str(&format!(
            "; {} event{} not shown (ring buffer full), still counted",
            s.dropped_events,
            if s.dropped_events == 1 { "" } else { "s" }
        ));
    }
    if s.lru_evictions > 0 {
        out.push_str(&format!(
            "; {} socket owner(s) forgotten (ownership maps full: raise --max-tracked-sockets)",
            s.lru_evictions
        ));
    }
    if s.uncounted_keys > 0 {
        out.push_str(&format!(
            "; {} failure(s) missing from the per-process table (counts map full)",
            s.uncounted_keys
        ));
    }
    out.push('\n');
    for (kind, why) in &s.not_watched {
        out.push_str(&format!("Not watched: {kind} ({why})\n"));
    }
    if s.offenders.is_empty() {
        out.push_str("No offenders.\n");
        call_sites_section(&mut out, s);
        return out;
    }
    out.push_str("Offenders:\n");
    out.push_str(&super::text::offenders(
        s.offenders.iter().map(|o| (o.pid.to_string(), o)),
        "",
    ));
    out.push('\n');
    if !s.blame.is_empty() {
        out.push_str("\nWho holds the ports:");
        out.push_str(&human_blame(&s.blame));
    }
    out.push_str(&super::nat::summary(s));
    call_sites_section(&mut out, s);
    out
}

/// Call sites shown in the summary.
const SUMMARY_SITES: usize = 10;

fn call_sites_section(out: &mut String, s: &Totals) {
    if s.call_sites.is_empty() {
        return;
    }
    out.push_str("\nCall sites (the code that made the connects):\n");
    out.push_str(&super::text::call_sites(
        s.call_sites.iter().map(|c| (c.pid.to_string(), c)),
        SUMMARY_SITES,
        "",
    ));
    out.push('\n');
    let bound = crate::advice::BoundConnects::of_sites(&s.call_sites);
    if let Some(f) = crate::advice::bound_connects_finding(&bound) {
        out.push_str(&format!("\n{}: {}\n", f.severity.name(), f.title));
        out.push_str("  ");
        out.push_str(&super::text::wrap(&f.detail, 96, 2));
        out.push('\n');
        for fix in &f.fixes {
            out.push_str("  ");
            out.push_str(&super::text::wrap(&format!("fix: {}", fix.text), 96, 2));
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use portexhaust_common::Backend;

    use super::*;
    use crate::schema::{DestCount, Errno, Offender, Runtime, Ts, tests::failure};

    #[test]
    fn container_in_the_human_output() {
        let mut f = failure();
        f.container = Some(std::sync::Arc::new(ContainerInfo {
            runtime: Runtime::Containerd,
            id: "0123456789abcdef".repeat(4),
            pod: Some("7c9a4e2b-1f3d-4a5b-9c8d-0e1f2a3b4c5d".into()),
        }));
        let l = human_line(&f);
        assert_eq!(
            human_header().find("CONTAINER"),
            l.find("containerd:0123456789ab")
        );
    }

    fn summary() -> Totals {
        Totals {
            backend: Some(Backend::Tracepoint),
            watched: vec!["connect".into()],
            not_watched: [("bind".to_string(), "no fexit or kprobe".to_string())].into(),
            duration_s: Some(2.5),
            failures_total: 30,
            dropped_events: 2,
            offenders: vec![Offender {
                pid: 4242,
                comm: "python3".into(),
                netns: None,
                failures: 30,
                first_ts: Some(Ts(1_764_069_600_000_000_000)),
                last_ts: Some(Ts(1_764_069_601_000_000_000)),
                destinations: vec![DestCount {
                    dst: "127.0.0.1:27017".parse().expect("addr"),
                    errno: Errno::EADDRNOTAVAIL,
                    cause: portexhaust_common::Cause::Exhausted,
                    failures: 30,
                }],
            }],
            ..Totals::default()
        }
    }

    #[test]
    fn human_output_is_aligned() {
        let h = human_header();
        let l = human_line(&failure());
        // Every column of the row starts where its header starts.
        for name in ["PID", "COMM", "DESTINATION", "SITE"] {
            let at = h.find(name).expect("header column");
            assert!(at <= l.len(), "{name}");
        }
        assert_eq!(h.find("COMM"), l.find("python3"));
        assert_eq!(h.find("DESTINATION"), l.find("127.0.0.1:27017"));
        assert!(l.ends_with("__inet_hash_connect -"), "{l:?}");
        assert_eq!(h.find("CONTAINER"), l.find(" -").map(|i| i + 1));
        let s = human_summary(&summary());
        assert!(s.contains("30 exhaustion failures"));
        assert!(s.contains("2 events not shown"));
        assert!(s.contains("127.0.0.1:27017 EADDRNOTAVAIL x30"));
        assert!(s.contains("Not watched: bind (no fexit or kprobe)"));
    }
}
