//! The tables of BENCHMARKS.md: a row per metric, a column per variant, then the ratios
//! between variants.
use std::fmt::Write as _;

use super::{find, median, paired};
use crate::bench::{
    results::{Row, Run},
    stats::{Spread, human, ratio},
};

/// A ratio for a table cell: paired per repetition when the runs allow it, else of medians.
fn ratio_cell(
    rows: &[Row],
    runs: &[Run],
    scenario: &str,
    a: &str,
    b: &str,
    metric: &str,
) -> String {
    match paired(runs, scenario, a, b, metric) {
        Some(s) if s.n > 1 && s.min != s.max => {
            format!("{:.3} ({:.3}-{:.3})", s.median, s.min, s.max)
        }
        Some(s) => format!("{:.3}", s.median),
        None => ratio(
            median(rows, scenario, a, metric),
            median(rows, scenario, b, metric),
        )
        .map(|r| format!("{r:.3}"))
        .unwrap_or_else(|| "-".into()),
    }
}

/// (metric, label, whether a ratio between variants means something)
type Spec = (&'static str, &'static str, bool);

pub(super) const CHURN: &[Spec] = &[
    ("connects_per_s", "connects/s (higher is better)", true),
    (
        "false_failures",
        "failures reported (all connects succeeded: must be 0)",
        false,
    ),
    (
        "client_cpu_us_per_connect",
        "churn process CPU us per connect (lower is better)",
        true,
    ),
    ("tracer_cpu_s", "tracer CPU seconds during the run", true),
    (
        "tracer_cpu_s_per_m",
        "tracer CPU seconds per million connects",
        true,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
];

pub(super) const STORM: &[Spec] = &[
    ("failures_per_s", "failures/s (higher is better)", true),
    (
        "client_cpu_us_per_failure",
        "storm processes' CPU us per failure (lower is better)",
        true,
    ),
    ("client_failures", "failures the clients saw", false),
    ("reported_failures", "failures the tracer reported", false),
    ("exact", "exact (1 = every run)", false),
    (
        "events_streamed",
        "events streamed (every process on the machine)",
        false,
    ),
    (
        "dropped_events",
        "events dropped from the stream (still counted)",
        false,
    ),
];

pub(super) const COST: &[Spec] = &[
    (
        "tracer_cpu_s_per_m",
        "tracer CPU s per million failures",
        true,
    ),
    ("tracer_user_s_per_m", "  of which user", true),
    ("tracer_sys_s_per_m", "  of which system", true),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    (
        "tracer_rss_mib",
        "tracer RSS at the end of the storm (MiB)",
        true,
    ),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    ("bpf_maps", "BPF maps", false),
    ("bpf_programs", "BPF programs", false),
];

pub(super) const READY: &[Spec] = &[
    ("ready_ms", "start -> attached and reading (ms)", true),
    (
        "attaching_ms",
        "start -> \"Attaching N probes\" (ms)",
        false,
    ),
];

pub(super) const START: &[Spec] = &[
    ("ready_ms", "start -> attached and reading (ms)", true),
    (
        "attaching_ms",
        "start -> \"Attaching N probes\" (ms)",
        false,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    ("bpf_maps", "BPF maps", false),
    ("bpf_programs", "BPF programs", false),
];

pub(super) const SCALE: &[Spec] = &[
    ("connections", "connections held", false),
    ("established", "ESTABLISHED sockets in the namespace", false),
    (
        "open_rate_per_s",
        "holder connects/s while opening (higher is better)",
        true,
    ),
    ("tracked_sockets", "sockets the tracer tracks", false),
    (
        "tracer_rss_mib",
        "tracer RSS with the sockets open (MiB)",
        true,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    (
        "census_ready_ms",
        "a tracer started with the sockets open: start -> ready (ms, median of its starts)",
        true,
    ),
    (
        "census_done_ms",
        "  start -> its census of the open sockets done (ms)",
        true,
    ),
    (
        "census_peak_rss_mib",
        "  its peak RSS (MiB, highest of its starts)",
        true,
    ),
    ("census_tracked_sockets", "  sockets it tracks", false),
    ("holder_rss_mib", "holder processes' RSS (MiB)", false),
];

pub(super) fn cell(s: Option<&Spread>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => human(s.median),
        Some(s) => format!("{} ({}-{})", human(s.median), human(s.min), human(s.max)),
    }
}

pub(super) fn table(
    out: &mut String,
    rows: &[Row],
    runs: &[Run],
    scenario: &str,
    variants: &[String],
    specs: &[Spec],
) {
    let pes: Vec<&String> = variants
        .iter()
        .filter(|v| {
            ["portexhaust/", "no-blame/", "catch/", "catch-nat/"]
                .iter()
                .any(|p| v.starts_with(p))
        })
        .collect();
    let has_untraced = variants.iter().any(|v| v == "untraced");
    let has_bpftrace = variants.iter().any(|v| v == "bpftrace");
    let shown: Vec<&String> = variants
        .iter()
        .filter(|v| {
            rows.iter()
                .any(|r| r.scenario == scenario && &r.variant == *v)
        })
        .collect();
    if shown.is_empty() {
        out.push_str("(not run)\n\n");
        return;
    }
    let _ = write!(out, "| metric |");
    for v in &shown {
        let _ = write!(out, " {v} |");
    }
    let mut ratio_cols: Vec<(&String, &str)> = Vec::new();
    let untraced_shown = has_untraced && shown.iter().any(|v| v.as_str() == "untraced");
    let bpftrace_shown = has_bpftrace && shown.iter().any(|v| v.as_str() == "bpftrace");
    for pe in &pes {
        if untraced_shown {
            ratio_cols.push((pe, "untraced"));
        }
        if bpftrace_shown {
            ratio_cols.push((pe, "bpftrace"));
        }
    }
    for h in shown.iter().filter(|v| v.starts_with("hooks-only/")) {
        if untraced_shown {
            ratio_cols.push((h, "untraced"));
        }
    }
    for (pe, base) in &ratio_cols {
        let _ = write!(out, " {pe} / {base} |");
    }
    out.push_str("\n|---|");
    for _ in 0..shown.len() + ratio_cols.len() {
        out.push_str("---|");
    }
    out.push('\n');
    for &(metric, label, with_ratio) in specs {
        if !rows
            .iter()
            .any(|r| r.scenario == scenario && r.metric == metric)
        {
            continue;
        }
        let _ = write!(out, "| {label} |");
        for v in &shown {
            let _ = write!(out, " {} |", cell(find(rows, scenario, v, metric)));
        }
        for (pe, base) in &ratio_cols {
            let r = if with_ratio {
                ratio_cell(rows, runs, scenario, pe, base, metric)
            } else {
                "-".into()
            };
            let _ = write!(out, " {r} |");
        }
        out.push('\n');
    }
    out.push('\n');
}
